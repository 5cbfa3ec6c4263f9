// A record rendered as the model sees it, which characters the training loss scores, and
// where each field's characters landed (so token offsets map back into the JSONL line).
// The one rendering used by the server (fit, explain, gradients, tokenize) and the editor
// (selection parser, hovers).
//
// - {"text"}: the text; every character is scored.
// - {"prompt","completion"}: concatenated with no separator (the user controls spacing, as
//   most fine-tuning scripts do); the completion's characters are scored.
// - {"messages"}: with the model's chat template when it has one (chat-template.ts): the
//   assistant turns are scored. Without one, the stand-in `<|role|>\n` + content + `\n` per
//   message, the assistant contents and their `\n` scored, and `rendering` says so.
import type { ChatTemplate } from './chat-template';
import type { RecordKind, RecordValue } from './shape';

/** A character range [start, end) in UTF-16 code units (JS string indices). */
export type Span = [number, number];

/** A field's characters [fieldStart, fieldStart + (end - start)) appear verbatim at text[start, end). */
export interface FieldPiece {
  /** 'text' | 'prompt' | 'completion' | 'messages[3].content' */
  field: string;
  start: number;
  end: number;
  fieldStart: number;
}

export type Rendering = 'plain' | 'chat_template' | 'stand-in';

export interface RenderedRecord {
  kind: RecordKind;
  text: string;
  /** character ranges whose tokens the training loss scores */
  spans: Span[];
  pieces: FieldPiece[];
  /** how messages were rendered: the model's chat template, or the stand-in (no template) */
  rendering: Rendering;
  /** the last scored span and the field it belongs to: what a whole selected record explains */
  last: { span: Span; field: string };
  /** a conversational prompt/completion: `spans` are the completion's assistant turns */
  promptCompletion?: boolean;
  /**
   * a prompt/completion record's prompt as rendered alone: the "prompt" string, or a
   * conversational prompt through the chat template with the generation prompt (TRL tokenizes it
   * to find where the completion starts), rendered on demand; absent for the stand-in rendering.
   * A template that fails on the prompt alone throws its ChatTemplateError here.
   */
  prompt?: () => string;
}

/** The stand-in chat rendering, used when the model has no chat template. */
export function renderStandIn(messages: RecordValue & { kind: 'messages' }): RenderedRecord {
  let text = '';
  const spans: Span[] = [];
  const pieces: FieldPiece[] = [];
  let last: RenderedRecord['last'] | undefined;
  for (const [i, m] of messages.messages.entries()) {
    text += `<|${m.role}|>\n`;
    const start = text.length;
    text += m.content;
    const field = `${messages.paths[i]}.content`;
    pieces.push({ field, start, end: text.length, fieldStart: 0 });
    text += '\n';
    if (m.role === 'assistant' && i >= messages.scoredFrom) {
      spans.push([start, text.length]);
      last = { span: [start, text.length], field };
    }
  }
  return {
    kind: 'messages',
    text,
    spans,
    pieces,
    rendering: 'stand-in',
    last: last!,
    ...(messages.scoredFrom > 0 ? { promptCompletion: true } : {}),
  };
}

export function renderRecord(value: RecordValue, template?: ChatTemplate): RenderedRecord {
  if (value.kind === 'text') {
    const n = value.text.length;
    return {
      kind: 'text',
      text: value.text,
      spans: [[0, n]],
      pieces: [{ field: 'text', start: 0, end: n, fieldStart: 0 }],
      rendering: 'plain',
      last: { span: [0, n], field: 'text' },
    };
  }
  if (value.kind === 'prompt_completion') {
    const p = value.prompt.length;
    const text = value.prompt + value.completion;
    return {
      kind: 'prompt_completion',
      text,
      spans: [[p, text.length]],
      pieces: [
        { field: 'prompt', start: 0, end: p, fieldStart: 0 },
        { field: 'completion', start: p, end: text.length, fieldStart: 0 },
      ],
      rendering: 'plain',
      last: { span: [p, text.length], field: 'completion' },
      prompt: () => value.prompt,
    };
  }
  if (!template) return renderStandIn(value);
  const chat = template.render(value.messages);
  const pieces = chat.placements.map(
    (p): FieldPiece => ({
      field: `${value.paths[p.message]}.content`,
      start: p.start,
      end: p.end,
      fieldStart: p.contentStart,
    }),
  );
  // a conversational prompt's own assistant turns are context, not trained on
  const scored = chat.spanMessages.flatMap((m, k) => (m >= value.scoredFrom ? [k] : []));
  const k = scored[scored.length - 1];
  if (k === undefined) throw new Error('the chat template marks none of the trained assistant turns');
  // the last turn may span several blocks (its content, then its end marker): all of them
  const lastMessage = chat.spanMessages[k];
  const first = scored.find((j) => chat.spanMessages[j] === lastMessage) ?? k;
  return {
    kind: 'messages',
    text: chat.text,
    spans: scored.map((j) => chat.spans[j]),
    pieces,
    rendering: 'chat_template',
    last: { span: [chat.spans[first][0], chat.spans[k][1]], field: `${value.paths[lastMessage]}.content` },
    ...(value.scoredFrom > 0
      ? {
          promptCompletion: true,
          prompt: () =>
            chat.prompts?.get(value.scoredFrom) ?? template.renderPrompt(value.messages.slice(0, value.scoredFrom)),
        }
      : {}),
  };
}

/**
 * Maps a range of the rendered text into one field: [field, start, end) in the field's string,
 * or undefined when the range lies in template text (role headers, end-of-turn tokens). A range
 * that runs past a field's edge is cut to the field.
 */
export function toField(
  r: RenderedRecord,
  start: number,
  end: number,
): { field: string; start: number; end: number } | undefined {
  for (const p of r.pieces) {
    const a = Math.max(start, p.start);
    const b = Math.min(end, p.end);
    if (a < b || (start === end && start >= p.start && start <= p.end))
      return { field: p.field, start: p.fieldStart + a - p.start, end: p.fieldStart + Math.max(a, b) - p.start };
  }
  return undefined;
}
