// Finding a fine-tune's training checkpoints as trainers write them (model/checkpoints.ts):
// transformers' Trainer (test/fixtures/trainer_run, written by test/oracle/make_trainer_run.py
// with a real Trainer), our own `train --save-steps`, and the refusals of checkpoints that are
// not the same model.
import assert from 'node:assert/strict';
import { cpSync, mkdirSync, readFileSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, test } from 'node:test';
import { trainJob } from '../../src/server/cli/train';
import { openCheckpoint } from '../../src/server/model/checkpoint';
import {
  CheckpointsError,
  checkpointWeights,
  learningRateAt,
  parseCheckpointsSetting,
  planCheckpoints,
} from '../../src/server/model/checkpoints';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const RUN = 'test/fixtures/trainer_run';
const final = () => openCheckpoint(RUN);
let n = 0;

/** A copy of the Trainer run whose checkpoint-3 is changed by `edit`. */
function edited(edit: (ckDir: string) => void): string {
  const dir = join(home, `run${n++}`);
  cpSync(RUN, dir, { recursive: true });
  edit(join(dir, 'checkpoint-3'));
  return dir;
}

describe('Trainer output_dir (real trainer_state.json)', () => {
  test('a checkpoint of another run (its log disagrees at a shared step) is refused, naming both folders', () => {
    const state = (ck: string) => join(ck, 'trainer_state.json');
    for (const change of [
      (e: Record<string, number>) => ({ ...e, learning_rate: e.learning_rate * 2 }), // another schedule
      (e: Record<string, number>) => ({ ...e, loss: e.loss + 0.25 }), // the same schedule, another seed
    ]) {
      const dir = edited((ck) => {
        const s = JSON.parse(readFileSync(state(ck), 'utf8'));
        s.log_history = s.log_history.map(change);
        writeFileSync(state(ck), JSON.stringify(s));
      });
      assert.throws(
        () => planCheckpoints(dir, openCheckpoint(dir), 'auto'),
        (e: Error) =>
          e instanceof CheckpointsError &&
          /the training logs of .*checkpoint-3 and .*checkpoint-6 disagree at step 2 .*: they are not checkpoints of one run/.test(
            e.message,
          ),
      );
    }
  });

  test("auto finds checkpoint-3 and checkpoint-6 in step order, with the learning rate at each step from the run's log", () => {
    const plan = planCheckpoints(RUN, final(), 'auto')!;
    assert.deepEqual(
      plan.checkpoints.map((c) => [c.name, c.step]),
      [
        ['checkpoint-3', 3],
        ['checkpoint-6', 6],
      ],
    );
    // logging_steps 2: step 3 was not logged; checkpoint-6's log (the run's longest) has steps 2
    // and 4 around it, and the linear schedule's rate at 3 is halfway; step 6 was logged
    const state = (c: string) => JSON.parse(readFileSync(join(RUN, c, 'trainer_state.json'), 'utf8'));
    const logged = (step: number) =>
      state('checkpoint-6').log_history.find((e: { step: number }) => e.step === step).learning_rate as number;
    const lr3 = (logged(2) + logged(4)) / 2;
    const lr6 = logged(6);
    assert.ok(Math.abs(plan.checkpoints[0].learningRate! - lr3) < 1e-18);
    assert.equal(plan.checkpoints[1].learningRate, lr6);
    assert.deepEqual(
      plan.checkpoints.map((c) => c.rateFrom),
      [{ kind: 'interpolated', steps: [2, 4] }, { kind: 'logged' }],
    );
    assert.equal(plan.weighting, 'learning-rate');
    assert.ok(Math.abs(plan.weights[0] - lr3 / (lr3 + lr6)) < 1e-15);
    assert.ok(Math.abs(plan.weights[0] + plan.weights[1] - 1) < 1e-15);
    assert.match(plan.note!, /checkpoint-3's interpolated from steps 2 and 4.*save_steps a multiple of logging_steps/);
  });

  test('a checkpoint still being written (no trainer_state.json yet among ones that have it) is left out, said and watched', () => {
    const dir = edited((ck) => rmSync(join(ck, 'trainer_state.json')));
    const plan = planCheckpoints(dir, openCheckpoint(dir), 'auto')!;
    assert.deepEqual(
      plan.checkpoints.map((c) => c.name),
      ['checkpoint-6'],
    );
    assert.deepEqual(plan.pending, [join(resolve(dir), 'checkpoint-3')]);
    assert.match(plan.note!, /left out checkpoint-3: no trainer_state\.json yet/);
  });

  test('a checkpoint being written whose weights are still half there is left out too, unread', () => {
    const dir = edited((ck) => {
      rmSync(join(ck, 'trainer_state.json'));
      const w = join(ck, 'model.safetensors');
      writeFileSync(w, readFileSync(w).subarray(0, 100));
    });
    const plan = planCheckpoints(dir, openCheckpoint(dir), 'auto')!;
    assert.deepEqual(
      plan.checkpoints.map((c) => c.name),
      ['checkpoint-6'],
    );
  });

  test('checkpoints reached through symbolic links are found; so are the siblings of a model named by a link', () => {
    const dir = join(home, `links${n++}`);
    mkdirSync(dir);
    cpSync(RUN, join(dir, 'run'), { recursive: true });
    // the output_dir holds a link to a checkpoint kept elsewhere
    renameSync(join(dir, 'run', 'checkpoint-3'), join(dir, 'elsewhere-3'));
    symlinkSync(join(dir, 'elsewhere-3'), join(dir, 'run', 'checkpoint-3'));
    const plan = planCheckpoints(join(dir, 'run'), openCheckpoint(join(dir, 'run')), 'auto')!;
    assert.deepEqual(
      plan.checkpoints.map((c) => c.name),
      ['checkpoint-3', 'checkpoint-6'],
    );
    // runs/latest → checkpoint-6: its earlier sibling is summed, as for the folder itself
    symlinkSync(join(dir, 'run', 'checkpoint-6'), join(dir, 'latest'));
    const viaLink = planCheckpoints(join(dir, 'latest'), openCheckpoint(join(dir, 'latest')), 'auto')!;
    assert.deepEqual(
      viaLink.checkpoints.map((c) => c.name),
      ['checkpoint-3'],
    );
  });

  test('a model that is itself checkpoint-6 sums over its earlier siblings', () => {
    const plan = planCheckpoints(join(RUN, 'checkpoint-6'), openCheckpoint(join(RUN, 'checkpoint-6')), 'auto')!;
    assert.deepEqual(
      plan.checkpoints.map((c) => c.name),
      ['checkpoint-3'],
    );
  });

  test('off: no checkpoints; a model folder without checkpoints: none', () => {
    assert.equal(planCheckpoints(RUN, final(), 'off'), undefined);
    assert.equal(
      planCheckpoints('test/fixtures/models/llama', openCheckpoint('test/fixtures/models/llama'), 'auto'),
      undefined,
    );
  });

  test('explicit folders are used as given', () => {
    const plan = planCheckpoints(RUN, final(), parseCheckpointsSetting(`${RUN}/checkpoint-6`))!;
    assert.deepEqual(
      plan.checkpoints.map((c) => c.dir),
      [resolve(RUN, 'checkpoint-6')],
    );
  });

  test('a list with an empty name, or a setting misspelt ("Auto", "none"), is refused rather than read as folders', () => {
    assert.throws(() => parseCheckpointsSetting(`${RUN}/checkpoint-6,`), /has an empty name in its list/);
    assert.throws(() => parseCheckpointsSetting(`${RUN}/checkpoint-3,,${RUN}/checkpoint-6`), /empty name/);
    for (const v of ['Auto', 'none', 'OFF', 'false'])
      assert.throws(() => parseCheckpointsSetting(v), /use "auto" .* or "off", in lower case/, v);
    assert.equal(parseCheckpointsSetting('auto'), 'auto');
    assert.equal(parseCheckpointsSetting('off'), 'off');
    // a folder that happens to have such a name is still a folder
    mkdirSync(join(home, 'none'), { recursive: true });
    assert.deepEqual(parseCheckpointsSetting('none', home), [join(home, 'none')]);
  });

  test('learningRateAt: the entry at the step, else interpolated between the logged steps around it, else extrapolated', () => {
    const state = {
      log_history: [
        { step: 2, learning_rate: 3 },
        { step: 4, learning_rate: 2 },
        { step: 4, eval_loss: 1 },
        { step: 6, learning_rate: 1 },
      ],
    };
    assert.equal(learningRateAt(state, 4), 2);
    assert.equal(learningRateAt(state, 5), 1.5);
    // beyond the log: the line through the two nearest logged steps, never below 0
    assert.equal(learningRateAt(state, 1), 3.5);
    assert.equal(learningRateAt(state, 7), 0.5);
    assert.equal(learningRateAt(state, 9), 0);
    assert.equal(learningRateAt({ log_history: [{ step: 2, learning_rate: 3 }] }, 5), 3);
    assert.equal(learningRateAt({ log_history: [{ step: 2, loss: 1 }] }, 2), undefined);
  });
});

describe('unknown learning rates', () => {
  test('checkpoints without trainer_state.json or training_args.json: equal weights, and the plan says so', () => {
    const dir = edited((ck) => rmSync(join(ck, 'trainer_state.json')));
    // given by name, checkpoint-3 takes its rate from checkpoint-6's log of the same run
    const given = parseCheckpointsSetting(`${dir}/checkpoint-3,${dir}/checkpoint-6`);
    assert.deepEqual(planCheckpoints(dir, openCheckpoint(dir), given)!.checkpoints[0].rateFrom, {
      kind: 'interpolated',
      steps: [2, 4],
    });
    rmSync(join(dir, 'checkpoint-6', 'trainer_state.json'));
    const plan = planCheckpoints(dir, openCheckpoint(dir), given)!;
    assert.equal(plan.weighting, 'uniform');
    assert.deepEqual(plan.weights, [0.5, 0.5]);
    assert.match(plan.note!, /learning rate unknown for checkpoint-3, checkpoint-6 .*logging_steps ≤ save_steps/);
    assert.equal(plan.checkpoints[0].step, 3, 'the step comes from the folder name');
  });

  test('checkpointWeights: all zero is uniform too', () => {
    const w = checkpointWeights([
      { name: 'a', learningRate: 0 },
      { name: 'b', learningRate: 0 },
    ]);
    assert.equal(w.weighting, 'uniform');
    assert.match(w.note!, /all zero/);
  });
});

describe('refusals, one line naming the checkpoint', () => {
  const refuses = (dir: string, re: RegExp) => {
    assert.throws(
      () => planCheckpoints(dir, openCheckpoint(dir), 'auto'),
      (e: Error) => e instanceof CheckpointsError && re.test(e.message) && !e.message.includes('\n'),
    );
  };
  test('no weights', () =>
    refuses(
      edited((ck) => rmSync(join(ck, 'model.safetensors'))),
      /checkpoint-3 holds no weights/,
    ));
  test('another config', () =>
    refuses(
      edited((ck) => {
        const c = JSON.parse(readFileSync(join(ck, 'config.json'), 'utf8'));
        c.rms_norm_eps = 1e-3;
        writeFileSync(join(ck, 'config.json'), JSON.stringify(c));
      }),
      /checkpoint-3 is not the same model .*config\.json differs \(rms_norm_eps/,
    ));
  test('other parameter shapes (another model in the folder)', () =>
    refuses(
      edited((ck) => {
        const state = readFileSync(join(ck, 'trainer_state.json'));
        rmSync(ck, { recursive: true });
        cpSync('test/fixtures/models/llama_variant', ck, { recursive: true });
        writeFileSync(join(ck, 'trainer_state.json'), state); // a finished checkpoint, not one being written
      }),
      /checkpoint-3 is not the same model/,
    ));
  test('another tokenizer', () =>
    refuses(
      edited((ck) => {
        const t = JSON.parse(readFileSync(join(ck, 'tokenizer.json'), 'utf8'));
        t.added_tokens = [...(t.added_tokens ?? []), { ...t.added_tokens[0], id: 999, content: '<x>' }];
        writeFileSync(join(ck, 'tokenizer.json'), JSON.stringify(t));
      }),
      /checkpoint-3 has another tokenizer\.json/,
    ));
  test('a LoRA adapter checkpoint beside a full model', () =>
    refuses(
      edited((ck) => {
        const state = readFileSync(join(ck, 'trainer_state.json'));
        rmSync(ck, { recursive: true });
        mkdirSync(ck);
        writeFileSync(join(ck, 'trainer_state.json'), state);
        for (const f of ['adapter_config.json', 'adapter_model.safetensors'])
          cpSync(join('test/fixtures/models/llama_lora', f), join(ck, f));
      }),
      /checkpoint-3 is a LoRA adapter but the model .* is a full model/,
    ));
  test('two folders at one step', () =>
    assert.throws(
      () => planCheckpoints(RUN, final(), [resolve(RUN, 'checkpoint-3'), resolve(RUN, 'checkpoint-3')]),
      /both at step 3/,
    ));
  test('a setting that is neither auto, off nor folders', () =>
    assert.throws(() => parseCheckpointsSetting(','), CheckpointsError));
});

describe('our trainer: train --save-steps', () => {
  test('checkpoint-<step>/training_args.json gives the step and the learning rate at it', async () => {
    const out = join(home, 'ours');
    await trainJob({
      data: join(RUN, 'train.jsonl'),
      out,
      model: 'test/fixtures/models/llama',
      epochs: 1,
      lr: 1e-3,
      batchSize: 2,
      seed: 0,
      clip: 1,
      weightDecay: 0,
      threads: 1,
      saveSteps: 2,
    });
    const plan = planCheckpoints(out, openCheckpoint(out), 'auto')!;
    assert.deepEqual(
      plan.checkpoints.map((c) => c.name),
      ['checkpoint-2'],
    );
    const args = JSON.parse(readFileSync(join(out, 'checkpoint-2', 'training_args.json'), 'utf8'));
    assert.equal(plan.checkpoints[0].step, args.global_step);
    assert.equal(plan.checkpoints[0].learningRate, args.learning_rate);
    assert.equal(plan.weighting, 'learning-rate');
  });
});
