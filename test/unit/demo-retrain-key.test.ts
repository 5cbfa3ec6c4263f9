// The demo caches the model it retrains without the flagged examples under a key of everything that
// determines it. The trainer tokenizes the data with the starting model's tokenizer and copies it
// into the model, so a tokenizer.json changed under the same weights must be another key: an audit
// swapped two word ids in every shipped tokenizer.json, and the demo said "retrained model: cached"
// and served the model trained (and saved) with the old tokenizer (log p −14.182, a fresh cache −14.487).
import assert from 'node:assert/strict';
import { cpSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { retrainedModelKey } from '../../src/server/cli/demo';
import { embeddedDefault } from '../../src/server/defaults';
import { useTempHome } from './helpers/env';

const home = useTempHome();

test("the demo's retrained-model cache key changes with the starting model's tokenizer and chat template", () => {
  const d = embeddedDefault();
  const pt = join(home, 'pretrained');
  cpSync(d.pretrained, pt, { recursive: true });
  const args = { epochs: 1 };
  const excluded = ['a', 'b'];
  const key = () => retrainedModelKey(pt, d.finetuneData, args, excluded);
  const first = key();
  assert.equal(key(), first, 'the same files give the same key');
  assert.equal(retrainedModelKey(d.pretrained, d.finetuneData, args, excluded), first, 'a copy elsewhere too');

  // two words' ids swapped: the same weights and config, other token ids for the data
  const tj = join(pt, 'tokenizer.json');
  const original = readFileSync(tj, 'utf8');
  const t = JSON.parse(original);
  const v = t.model.vocab as Record<string, number>;
  [v['\u0120France'], v['\u0120Germany']] = [v['\u0120Germany'], v['\u0120France']];
  writeFileSync(tj, JSON.stringify(t));
  const swapped = key();
  assert.notEqual(swapped, first, 'another tokenizer.json is another retrained model');

  // a chat template added beside it: chats are rendered (and trained) otherwise
  writeFileSync(tj, original);
  assert.equal(key(), first);
  writeFileSync(join(pt, 'chat_template.jinja'), '{% for m in messages %}{{ m.content }}\n{% endfor %}');
  assert.notEqual(key(), first, 'a chat template is another retrained model');
});
