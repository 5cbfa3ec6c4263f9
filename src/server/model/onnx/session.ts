// Opening ONNX Runtime sessions on the device the user asked for.
// CPU always works; WebGPU / CUDA are opt-in, and when unavailable we say so plainly
// instead of silently falling back (the user asked for a GPU for a reason).
import * as ort from 'onnxruntime-node';
import { EnvSettingError, switchEnv } from '../../util/env';
import { configureMalloc } from '../../util/malloc';

export type Device = 'cpu' | 'webgpu' | 'cuda';
export const DEVICES: readonly Device[] = ['cpu', 'webgpu', 'cuda'];

export interface SessionOptions {
  device?: Device;
  /** Intra-op threads; default: ORT's choice (all cores). */
  threads?: number;
  /** Weight files handed over as buffers (when the model cannot reference them on disk). */
  externalData?: Array<{ path: string; data: Uint8Array }>;
  /** 'basic' skips ORT's operator fusions, some of which (QuickGelu, …) exist only in float32 */
  optimization?: 'all' | 'basic';
  /** ONNX Runtime's CPU memory arena for this session; default: on only under INFLUENCE_LENS_ORT_ARENA=on */
  arena?: boolean;
}

export class DeviceError extends Error {}

function providerFor(device: Device): string {
  const backends = ort.listSupportedBackends?.() ?? [];
  const b = backends.find((x) => x.name === device);
  if (device === 'cpu') return 'cpu';
  if (!b)
    throw new DeviceError(
      `device "${device}" is not known to this onnxruntime-node build (has: ${backends.map((x) => x.name).join(', ')})`,
    );
  if (device === 'cuda' && !b.bundled)
    throw new DeviceError(
      'device "cuda" needs ONNX Runtime\'s CUDA provider libraries, which onnxruntime-node downloads at install time ' +
        '(run `ONNXRUNTIME_NODE_INSTALL=cuda12 npm rebuild onnxruntime-node` on a machine with CUDA 12 + cuDNN 9), or use device "webgpu" or "cpu".',
    );
  return device;
}

/** A float tensor in fp64 or float32 (converting only when the array's type differs). */
export function floatTensor(fp64: boolean, v: Float32Array | Float64Array, shape: number[]): ort.Tensor {
  return fp64
    ? new ort.Tensor('float64', v instanceof Float64Array ? v : Float64Array.from(v), shape)
    : new ort.Tensor('float32', v instanceof Float32Array ? v : Float32Array.from(v), shape);
}

export async function createSession(
  model: Uint8Array | string,
  opts: SessionOptions = {},
): Promise<ort.InferenceSession> {
  const device = opts.device ?? 'cpu';
  // freed tensors go back to the system instead of staying in malloc's heap (malloc.ts)
  configureMalloc();
  const so: ort.InferenceSession.SessionOptions = {
    executionProviders: [providerFor(device)],
    graphOptimizationLevel: opts.optimization ?? 'all',
    // Weight prepacking would copy every weight matrix; our weights are external
    // (mapped from the safetensors file), so keep them shared.
    extra: { session: { disable_prepacking: '1' } },
  };
  // ONNX Runtime's CPU arena keeps each session's largest run resident for the session's life
  // (see `arenaPolicy`): the caller says which sessions may have one.
  so.enableCpuMemArena = opts.arena ?? arenaPolicy() === 'on';
  if (opts.externalData) so.externalData = opts.externalData;
  // INFLUENCE_LENS_ORT_PROFILE=<prefix>: ONNX Runtime's per-node profile (Chrome trace JSON,
  // <prefix>_<timestamp>.json per session, written by session.endProfiling()), for finding
  // where a graph's time goes (see bench/results/2026-12-03-vm-engine-profile.md).
  const profile = ortProfilePrefix();
  if (profile) {
    so.enableProfiling = true;
    so.profileFilePrefix = profile;
  }
  if (opts.threads) {
    so.intraOpNumThreads = opts.threads;
    so.interOpNumThreads = 1;
  }
  try {
    return typeof model === 'string'
      ? await ort.InferenceSession.create(model, so)
      : await ort.InferenceSession.create(model, so);
  } catch (e) {
    const msg = (e as Error).message;
    if (device !== 'cpu')
      throw new DeviceError(
        `could not open the model on device "${device}": ${msg}. Use device "cpu" or check the GPU driver.`,
      );
    throw e;
  }
}

/**
 * Which sessions get ONNX Runtime's CPU memory arena (INFLUENCE_LENS_ORT_ARENA):
 * - 'scores' (default): the graphs that score candidates against query rows, run batch after
 *   batch over a corpus with only [B, Q] scores coming out. Without the arena every run, and every
 *   chunk of the LM head inside it, allocated fresh memory and page-faulted it in: at Pythia-70M
 *   × 256 candidates (same host, one run after the other) the candidate pass took 160 ms a
 *   candidate without it and 113 ms with it, for 0.40 GB more peak memory (0.57 GB for one CLI
 *   explain; docs/MEASUREMENTS.md).
 * - 'on': every session (the fit's graphs gained nothing measurable, and their arenas add up:
 *   3.81 GB peak against 2.76 GB with 'scores' at Pythia-70M × 256);
 * - 'off': none (the lowest memory: each run's memory goes back to the system after it).
 * An arena keeps its session's largest run resident until the session is released, so a
 * long-lived server holds about one scoring batch's working set (the run budget) after scoring.
 */
export type ArenaPolicy = 'scores' | 'on' | 'off';

export function arenaPolicy(): ArenaPolicy {
  const raw = process.env.INFLUENCE_LENS_ORT_ARENA;
  if ((raw ?? '').trim().toLowerCase() === 'scores') return 'scores';
  try {
    const on = switchEnv('INFLUENCE_LENS_ORT_ARENA');
    return on === undefined ? 'scores' : on ? 'on' : 'off';
  } catch {
    throw new EnvSettingError(
      `INFLUENCE_LENS_ORT_ARENA="${raw}": use scores (default: the candidate-scoring graphs only), on (every graph) or off (none)`,
    );
  }
}

/** INFLUENCE_LENS_ORT_PROFILE=<prefix> turns on ONNX Runtime's per-node profiling (default off). */
export function ortProfilePrefix(): string | null {
  const v = (process.env.INFLUENCE_LENS_ORT_PROFILE ?? '').trim();
  return v ? v : null;
}

export { ort };
