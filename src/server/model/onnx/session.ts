// Opening ONNX Runtime sessions on the device the user asked for.
// CPU always works; WebGPU / CUDA are opt-in, and when unavailable we say so plainly
// instead of silently falling back (the user asked for a GPU for a reason).
import * as ort from 'onnxruntime-node';
import { switchEnv } from '../../util/env';
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
  // ONNX Runtime's CPU arena keeps every run's peak in each session for the life of the
  // session; with one session per graph kind (covariance, Λ, query gradients, scores) the
  // Pythia-70M-shape fit + score peaked at 8.5 GB with it and 6.1 GB without (bench
  // `ekfac --shape pythia-70m`), for 0-25% more time. INFLUENCE_LENS_ORT_ARENA=on restores it.
  so.enableCpuMemArena = ortArenaEnabled();
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

/** INFLUENCE_LENS_ORT_ARENA=on|1|true turns ONNX Runtime's CPU memory arena back on (default off). */
export function ortArenaEnabled(): boolean {
  return switchEnv('INFLUENCE_LENS_ORT_ARENA') ?? false;
}

/** INFLUENCE_LENS_ORT_PROFILE=<prefix> turns on ONNX Runtime's per-node profiling (default off). */
export function ortProfilePrefix(): string | null {
  const v = (process.env.INFLUENCE_LENS_ORT_PROFILE ?? '').trim();
  return v ? v : null;
}

export { ort };
