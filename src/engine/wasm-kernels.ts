import * as tf from '@tensorflow/tfjs-core';
import { overrideKernel } from './kernels.js';

/**
 * tfjs-wasm copies data for Identity and for a Cast to the same dtype. The autodiff tape clones
 * (Identity) every tensor a gradient saves, so each matmul copied its activations and weights
 * once more per training step. Tensors are immutable, so a clone can share the buffer and bump
 * its reference count — what tfjs's cpu backend and wasm's own Reshape already do.
 */
let done = false;

export function registerZeroCopyKernels(): void {
  if (done || tf.getBackend() !== 'wasm') return;
  const share = (be: any, x: tf.TensorInfo) => {
    be.incRef(x.dataId);
    return { dataId: x.dataId, shape: x.shape, dtype: x.dtype };
  };
  for (const name of ['Identity', 'Cast'])
    overrideKernel(name, 'wasm', (args, original) => {
      const x = args.inputs.x as tf.TensorInfo;
      const same = name === 'Identity' ? x.dtype !== 'string' : args.attrs.dtype === x.dtype;
      return same ? share(args.backend, x) : original(args);
    });
  done = true;
}
