import * as fs from 'node:fs';
import * as tf from '@tensorflow/tfjs-core';
import { readHeader, readTensor, writeSafetensors } from '../io/safetensors.js';
import { UserError } from '../util/errors.js';

/** Trainable parameters as they are in memory, for training checkpoints (exact F32 round trip). */
export async function saveParams(params: Map<string, tf.Variable>, file: string): Promise<void> {
  const entries = [...params].map(([name, v]) => ({ name, shape: v.shape }));
  await writeSafetensors(file, entries, 'F32', (n) => params.get(n)!.dataSync() as Float32Array, { format: 'prefopt-train' });
}

export function loadParams(params: Map<string, tf.Variable>, file: string): void {
  if (!fs.existsSync(file)) throw new UserError(`${file}: missing training weights`);
  const st = readHeader(file);
  for (const [name, v] of params) {
    const info = st.tensors.get(name);
    if (!info) throw new UserError(`${file}: missing tensor "${name}"`);
    if (info.shape.join() !== v.shape.join()) throw new UserError(`${file}: tensor "${name}" has shape [${info.shape}], expected [${v.shape}]`);
    const t = tf.tensor(readTensor(st, name), v.shape);
    v.assign(t);
    t.dispose();
  }
}

/** The trainer's saveState/loadState for a set of parameters kept in one safetensors file. */
export function paramsCheckpoint(params: Map<string, tf.Variable>, fileName: string) {
  return {
    saveState: async (dir: string) => {
      fs.mkdirSync(dir, { recursive: true });
      await saveParams(params, `${dir}/${fileName}`);
    },
    loadState: (dir: string) => loadParams(params, `${dir}/${fileName}`),
  };
}
