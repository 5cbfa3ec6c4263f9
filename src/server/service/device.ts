// Is the device the configuration asks for really there? We open a one-node ONNX session on it
// (the execution provider either initialises or fails), so `serve` can refuse to start with a
// clear message instead of falling back to the CPU behind the user's back.
import { DataType, encodeModel } from '../model/onnx/proto';
import { createSession, type Device, ort } from '../model/onnx/session';

export class DeviceUnavailableError extends Error {}

let probe: Uint8Array | undefined;

/** y = x + x on a [2] float tensor. */
function probeModel(): Uint8Array {
  probe ??= encodeModel({
    graphName: 'device_probe',
    nodes: [{ opType: 'Add', inputs: ['x', 'x'], outputs: ['y'] }],
    initializers: [],
    inputs: [{ name: 'x', dataType: DataType.FLOAT, shape: [2] }],
    outputs: [{ name: 'y', dataType: DataType.FLOAT, shape: [2] }],
    opsets: [{ domain: '', version: 21 }],
  });
  return probe;
}

/** Resolves when `device` works; throws DeviceUnavailableError saying why and what to do otherwise. */
export async function checkDevice(device: Device, field = 'device'): Promise<void> {
  if (device === 'cpu') return;
  let session: ort.InferenceSession | undefined;
  try {
    session = await createSession(probeModel(), { device });
    const x = new ort.Tensor('float32', Float32Array.from([1, 2]), [2]);
    const { y } = await session.run({ x });
    const v = y.data as Float32Array;
    if (v[0] !== 2 || v[1] !== 4) throw new Error(`a test computation gave ${Array.from(v)} instead of 2,4`);
  } catch (e) {
    const why = (e as Error).message.replace(/\s+/g, ' ').trim();
    const advice = why.includes('"cpu"') ? '' : ' Set "device": "cpu" to run on the CPU.';
    throw new DeviceUnavailableError(`${field}: "${device}" is not available here: ${why}${advice}`);
  } finally {
    await session?.release().catch(() => {});
  }
}
