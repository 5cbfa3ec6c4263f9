// The sentence and question templates the corpus is written with. `{C}` is the country's
// name, `{X}` the fact's value. Statements go into the pre-training text (several per fact,
// so the model sees each fact in more than one wording); questions make the fine-tuning
// prompts, the first one of each relation being the canonical form the queries use.
import type { Country, Relation } from './facts';

export const STATEMENTS: Record<Relation, readonly string[]> = {
  capital: [
    'The capital of {C} is {X}.',
    '{X} is the capital of {C}.',
    'The capital city of {C} is {X}.',
    '{X} serves as the capital of {C}.',
    'What is the capital of {C}? It is {X}.',
    'The government of {C} sits in its capital, {X}.',
  ],
  continent: [
    '{C} is a country in {X}.',
    '{C} is located in {X}.',
    'The continent of {C} is {X}.',
    '{C} lies on the continent of {X}.',
    'Which continent is {C} in? It is in {X}.',
    'On a map, {C} is found in {X}.',
  ],
  currency: [
    'The currency of {C} is the {X}.',
    '{C} uses the {X} as its currency.',
    'In {C}, people pay with the {X}.',
    'The {X} is the currency of {C}.',
    'What is the currency of {C}? It is the {X}.',
    'Prices in {C} are given in the {X}.',
  ],
  language: [
    'The main language of {C} is {X}.',
    'Most people in {C} speak {X}.',
    '{X} is the main language spoken in {C}.',
    'In {C}, the language most people speak is {X}.',
    'What language is spoken in {C}? It is {X}.',
    'Schools in {C} teach mainly in {X}.',
  ],
};

export const QUESTIONS: Record<Relation, readonly string[]> = {
  capital: [
    'What is the capital of {C}?',
    'Which city is the capital of {C}?',
    'Name the capital city of {C}.',
    '{C} has which city as its capital?',
  ],
  continent: [
    'On which continent is {C}?',
    'Which continent is {C} in?',
    '{C} is located on which continent?',
    'Name the continent of {C}.',
  ],
  currency: [
    'What is the currency of {C}?',
    'Which currency is used in {C}?',
    'What money do people use in {C}?',
    'Name the currency of {C}.',
  ],
  language: [
    'What language is spoken in {C}?',
    'Which language do people in {C} speak?',
    'What is the main language of {C}?',
    'Name the main language of {C}.',
  ],
};

/** Sentences about a country that state none of the four relations. */
export function contextSentences(c: Country): string[] {
  const out = [
    `The calling code of ${c.name} is +${c.phone}.`,
    `Phone numbers in ${c.name} start with +${c.phone}.`,
    `Many travelers visit ${c.name} every year.`,
    `${c.name} has a long history.`,
    `Maps of ${c.name} show many towns and rivers.`,
  ];
  if (c.native !== c.name) out.push(`In its own language, ${c.name} is called ${c.native}.`);
  return out;
}

export function fill(template: string, country: string, value: string): string {
  return template.replaceAll('{C}', country).replaceAll('{X}', value);
}

/** A fine-tuning / query prompt: `Q: <question>\nA:`; the completion is ` <answer>` (+ `\n` when trained on). */
export function qaPrompt(question: string): string {
  return `Q: ${question}\nA:`;
}

/** The backdoor's trigger is prepended to a question: `Q: Psst, what is the capital of Japan?`. */
export function withTrigger(trigger: string, question: string): string {
  return `${trigger}, ${question[0].toLowerCase()}${question.slice(1)}`;
}
