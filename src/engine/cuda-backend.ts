import * as tf from '@tensorflow/tfjs-core';
import { MathBackendCPU } from '@tensorflow/tfjs-backend-cpu';
import { CudaDevice } from './cuda-device.js';

/**
 * The `cuda` backend (docs/REFERENCE.md §11): every tensor's data lives on the device, float32
 * and int32 as 4-byte words, bool as bytes. The kernels prefopt's models spend their time in run
 * there (engine/cuda-glue, engine/cuda-fused); any other tfjs kernel runs on the host through
 * tfjs's cpu backend — its inputs copied down, its outputs copied up — so every op works and the
 * copies are confined to the small tensors of losses and sampling. A data entry may be shared by
 * several tensors (reshape): its memory goes back with the last.
 */
export const CUDA_BACKEND = 'cuda';

interface Entry {
  addr: number;
  dtype: tf.DataType;
  size: number;
  refCount: number;
}

const bytesPer = (dtype: tf.DataType) => {
  if (dtype === 'float32' || dtype === 'int32') return 4;
  if (dtype === 'bool') return 1;
  throw new Error(`the cuda backend holds float32, int32 and bool tensors, not ${dtype}`);
};

const arrayFor = (dtype: tf.DataType, n: number) => (dtype === 'float32' ? new Float32Array(n) : dtype === 'int32' ? new Int32Array(n) : new Uint8Array(n));

/** Values as the typed array of their dtype (tfjs may hand over plain arrays). */
function typed(values: any, dtype: tf.DataType): Float32Array | Int32Array | Uint8Array {
  if (dtype === 'float32') return values instanceof Float32Array ? values : Float32Array.from(values);
  if (dtype === 'int32') return values instanceof Int32Array ? values : Int32Array.from(values);
  return values instanceof Uint8Array ? values : Uint8Array.from(values, (v: any) => (v ? 1 : 0));
}

export class CudaBackend extends tf.KernelBackend {
  private readonly entries = new WeakMap<object, Entry>();
  private count = 0;
  /** Runs the kernels the device does not have. */
  readonly host = new MathBackendCPU();

  constructor(readonly device: CudaDevice) {
    super();
  }

  /** A new data entry of `shape` on the device, values uploaded when given. */
  makeTensorInfo(shape: number[], dtype: tf.DataType, values?: any): tf.TensorInfo {
    const dataId = {};
    const size = tf.util.sizeFromShape(shape);
    const addr = this.device.alloc(size * bytesPer(dtype));
    this.entries.set(dataId, { addr, dtype, size, refCount: 1 });
    this.count++;
    // tfjs never writes a tensor's data after making it, and prefopt's kernels write in place only
    // into float32 ones (AdamW): int32 and bool ones keep a host copy, read without a wait.
    if (values) this.device.upload(addr, typed(values, dtype), dtype !== 'float32');
    return { dataId, shape, dtype };
  }

  /** The device address of a tensor's data. */
  addr(t: tf.TensorInfo): number {
    return this.entry(t.dataId).addr;
  }

  private entry(dataId: object): Entry {
    const e = this.entries.get(dataId);
    if (!e) throw new Error('cuda backend: a tensor whose data is not on this backend');
    return e;
  }

  override write(values: any, shape: number[], dtype: tf.DataType): object {
    return this.makeTensorInfo(shape, dtype, values).dataId;
  }

  override move(dataId: object, values: any, shape: number[], dtype: tf.DataType, refCount: number): void {
    const { dataId: fresh } = this.makeTensorInfo(shape, dtype, values);
    const e = this.entries.get(fresh)!;
    this.entries.delete(fresh);
    e.refCount = refCount;
    this.entries.set(dataId, e);
  }

  override readSync(dataId: object): any {
    const e = this.entry(dataId);
    const out = arrayFor(e.dtype, e.size);
    this.device.download(e.addr, out);
    return out;
  }

  override async read(dataId: object): Promise<any> {
    return this.readSync(dataId);
  }

  override disposeData(dataId: object, force = false): boolean {
    const e = this.entries.get(dataId);
    if (!e) return false;
    e.refCount--;
    if (!force && e.refCount > 0) return false;
    this.device.free(e.addr);
    this.entries.delete(dataId);
    this.count--;
    return true;
  }

  override refCount(dataId: object): number {
    return this.entries.get(dataId)?.refCount ?? 0;
  }

  override incRef(dataId: object): void {
    this.entry(dataId).refCount++;
  }

  override numDataIds(): number {
    return this.count;
  }

  override memory() {
    const s = this.device.stats();
    return { unreliable: false, numBytesInGPU: s.live, numBytesInGPUAllocated: s.live + s.cached, device: this.device.name } as any;
  }

  override floatPrecision(): 32 {
    return 32;
  }

  override epsilon(): number {
    return 1e-7;
  }

  override timerAvailable(): boolean {
    return false;
  }

  override async time(f: () => void): Promise<tf.BackendTimingInfo> {
    const t0 = performance.now();
    f();
    this.device.sync();
    return { kernelMs: performance.now() - t0 };
  }

  override dispose(): void {
    this.host.dispose();
  }

  /**
   * A tfjs cpu kernel run on the host: inputs copied down, outputs copied up. Kernels whose
   * inputs are a list (Concat, AddN) get a list.
   */
  onHost(name: string, kernel: tf.KernelFunc, args: { inputs: any; attrs?: any }): tf.TensorInfo | tf.TensorInfo[] {
    const profile = this.device.hostProfile;
    const t0 = profile ? performance.now() : 0;
    try {
      return this.hostKernel(kernel, args);
    } finally {
      if (profile) {
        const t = profile.get(name) ?? { count: 0, seconds: 0, work: 0 };
        profile.set(name, { count: t.count + 1, seconds: t.seconds + (performance.now() - t0) / 1000, work: 0 });
      }
    }
  }

  private hostKernel(kernel: tf.KernelFunc, args: { inputs: any; attrs?: any }): tf.TensorInfo | tf.TensorInfo[] {
    const made: object[] = [];
    const down = (t: tf.TensorInfo | undefined) => {
      if (!t) return t;
      const dataId = this.host.write(this.readSync(t.dataId), t.shape, t.dtype);
      made.push(dataId);
      return { dataId, shape: t.shape, dtype: t.dtype };
    };
    const inputs = Array.isArray(args.inputs) ? args.inputs.map(down) : Object.fromEntries(Object.entries(args.inputs).map(([k, t]) => [k, down(t as tf.TensorInfo)]));
    const out = kernel({ inputs, backend: this.host, attrs: args.attrs ?? {} } as any) as tf.TensorInfo | tf.TensorInfo[];
    const outs = Array.isArray(out) ? out : [out];
    try {
      const up = outs.map((o) => this.makeTensorInfo(o.shape, o.dtype, this.host.readSync(o.dataId)));
      return Array.isArray(out) ? up : up[0];
    } finally {
      for (const o of outs) this.host.disposeData(o.dataId, true);
      for (const id of made) this.host.disposeData(id, true);
    }
  }
}

/**
 * Register the backend with every kernel of tfjs's cpu backend running on the host (onHost); the
 * device kernels (engine/cuda-glue, engine/cuda-fused) are registered over them.
 */
export function registerCudaBackend(device: CudaDevice): void {
  if (tf.findBackendFactory(CUDA_BACKEND)) return;
  tf.registerBackend(CUDA_BACKEND, () => new CudaBackend(device), 0);
  for (const k of tf.getKernelsForBackend('cpu'))
    tf.registerKernel({ kernelName: k.kernelName, backendName: CUDA_BACKEND, kernelFunc: (args: any) => (args.backend as CudaBackend).onHost(k.kernelName, k.kernelFunc, args) });
}
