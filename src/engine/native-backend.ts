import * as tf from '@tensorflow/tfjs-core';
import { MathBackendCPU } from '@tensorflow/tfjs-backend-cpu';

/**
 * The `native` backend (docs/REFERENCE.md §11): tfjs's cpu backend, whose JavaScript kernels
 * serve the glue ops, with the tensors prefopt's native kernels write (every product, attention,
 * norm, activation and loss) held in memory the addon allocates and frees. Such a tensor's memory
 * goes back when its last tensor is disposed, not at some later garbage collection, so a step's
 * peak is what it keeps alive; `tf.memory().nativeBytes` counts it. There is no heap ceiling.
 *
 * A buffer may back several tensors (tfjs's reshape shares a tensor's data; a slice may be a
 * view of it): it is freed when the last of them is disposed. What `dataSync()` returns is a copy
 * for such tensors, so arrays read before a dispose stay valid after it.
 */
export const NATIVE_BACKEND = 'native';

/**
 * Bytes mapped for the allocator's live blocks, kept in its pool of freed blocks, the most ever
 * live at once (since the last trim), and ever mapped fresh or unmapped to make room.
 */
export interface PoolStats {
  live: number;
  pooled: number;
  highWater: number;
  mappedTotal: number;
  evictedTotal: number;
}

/**
 * The addon's allocator (native/addon.cc). Freed blocks are pooled for reuse, but live + pooled
 * never exceeds the high-water mark of live blocks: the pool does not raise a job's peak.
 */
export interface NativeAllocator {
  alloc(bytes: number): ArrayBuffer;
  free(buffer: ArrayBuffer): boolean;
  nativeBytes(): number;
  poolStats(): PoolStats;
  /** Unmap every pooled block and restart the high-water mark: between jobs. */
  trimPool(): void;
}

/** Outputs smaller than this stay in JavaScript's heap: the addon's allocation costs more than it saves there. */
const NATIVE_MIN_BYTES = 16 * 1024;

export class NativeMemoryBackend extends MathBackendCPU {
  /** Native buffers → how many of this backend's data entries hold a view of them. */
  private readonly users = new Map<ArrayBufferLike, number>();

  constructor(private readonly mem: NativeAllocator) {
    super();
  }

  /** A float32 array of n values for a kernel's output: native memory unless it is small. */
  allocFloat32(n: number): Float32Array {
    if (4 * n < NATIVE_MIN_BYTES) return new Float32Array(n);
    const b = this.mem.alloc(4 * n);
    this.natives.add(b);
    return new Float32Array(b, 0, n);
  }

  /** Hand back an array from allocFloat32 that no tensor took (a tensor's data is freed with it). */
  discard(a: Float32Array): void {
    if (this.natives.has(a.buffer) && !this.users.has(a.buffer)) this.mem.free(a.buffer as ArrayBuffer);
  }

  private hold(values: unknown): void {
    const b = (values as ArrayBufferView | null)?.buffer;
    if (b && this.natives.has(b)) this.users.set(b, (this.users.get(b) ?? 0) + 1);
  }

  private release(values: unknown): void {
    const b = (values as ArrayBufferView | null)?.buffer;
    const n = b ? this.users.get(b) : undefined;
    if (b === undefined || n === undefined) return;
    if (n > 1) this.users.set(b, n - 1);
    else {
      this.users.delete(b);
      this.mem.free(b as ArrayBuffer);
    }
  }

  /** The buffers allocFloat32 took from the addon. */
  private readonly natives = new WeakSet<ArrayBufferLike>();

  override write(values: any, shape: number[], dtype: tf.DataType) {
    const id = super.write(values, shape, dtype);
    this.hold(values);
    return id;
  }

  override move(dataId: any, values: any, shape: number[], dtype: tf.DataType, refCount: number): void {
    super.move(dataId, values, shape, dtype, refCount);
    this.hold(values);
  }

  override disposeData(dataId: any, force = false): boolean {
    const values = this.data.has(dataId) ? this.data.get(dataId).values : null;
    const gone = super.disposeData(dataId, force);
    if (gone && values) this.release(values);
    return gone;
  }

  override readSync(dataId: any) {
    const v = super.readSync(dataId) as any;
    return v?.buffer && this.users.has(v.buffer) ? v.slice() : v;
  }

  override async read(dataId: any) {
    return this.readSync(dataId);
  }

  override memory() {
    return { ...super.memory(), nativeBytes: this.mem.nativeBytes() } as any;
  }
}

/**
 * Register the backend (and every kernel of tfjs's cpu backend under its name). Its own native
 * kernels are registered by engine/native, as for wasm and cpu.
 */
export function registerNativeBackend(mem: NativeAllocator): void {
  if (tf.findBackendFactory(NATIVE_BACKEND)) return;
  tf.registerBackend(NATIVE_BACKEND, () => new NativeMemoryBackend(mem), 0);
  for (const k of tf.getKernelsForBackend('cpu')) tf.registerKernel({ ...k, backendName: NATIVE_BACKEND });
}

/**
 * An array for values that will become a tensor's data (loading weights): memory of the native
 * backend when it is the active one — huge pages, freed with the tensor, reused through its pool —
 * else the JavaScript heap. dropTensorArray hands back one that no tensor took.
 */
export function tensorArray(n: number): Float32Array {
  const b = tf.backend();
  return b instanceof NativeMemoryBackend ? b.allocFloat32(n) : new Float32Array(n);
}

export function dropTensorArray(a: Float32Array): void {
  const b = tf.backend();
  if (b instanceof NativeMemoryBackend) b.discard(a);
}
