// A tiny Llama (GQA: 2 heads, 1 KV head) written as a checkpoint with the llama fixture's
// tokenizer; weights scaled ×20 (norms aside) so that gradients and scores are far from zero.
import { initLlama, saveCheckpoint } from '../../../src/server/train/trainer';

export const TINY_LLAMA_TOKENIZER = 'test/fixtures/models/llama';
export const TINY_LLAMA_SHAPE = { vocab: 320, d: 8, layers: 2, heads: 2, kvHeads: 1, ffn: 12, maxPositions: 64 };

/** Writes the checkpoint into `dir` (`extra`: trainer_state-like fields such as global_step). */
export function makeTinyLlama(dir: string, seed: number, extra?: Record<string, unknown>): void {
  const { config, params, shapes } = initLlama(TINY_LLAMA_SHAPE, seed, { bos: 0, eos: 0, pad: 0 });
  for (const [name, p] of params) if (!name.includes('norm')) for (let i = 0; i < p.length; i++) p[i] *= 20;
  saveCheckpoint(dir, config, params, shapes, TINY_LLAMA_TOKENIZER, extra);
}
