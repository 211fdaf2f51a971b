import * as tf from '@tensorflow/tfjs-core';

/**
 * Activation checkpointing (docs/REFERENCE.md §10). `checkpoint(f, x, params)` returns f(x) but
 * records only x on the gradient tape: the forward pass runs inside one custom-gradient op (tfjs
 * records nothing below an op), so f's intermediates are freed as soon as f returns. The backward
 * pass runs f again from x under a tape of its own and backpropagates dy through it, giving the
 * gradients for x and for `params` (the trainable tensors f reads; frozen ones are left out, so
 * their gradients are never computed). Other tensors f reads (masks, rotary tables, labels) come
 * as `consts`: they are kept with x for the recompute, as the ones created for the forward pass
 * are freed when it ends.
 *
 * A random choice inside f (LoRA dropout) must repeat exactly when f runs again: `rng` saves the
 * random stream's state before the first run, restores it for the second, and puts the advanced
 * state back afterwards.
 */
export interface RngHooks {
  save(): unknown;
  restore(state: unknown): void;
}

interface EngineState {
  state: { activeTape: unknown[] | null };
  gradients(f: () => tf.Tensor, xs: tf.Tensor[], dy?: tf.Tensor): { value: tf.Tensor; grads: tf.Tensor[] };
}

export function checkpoint(f: (x: tf.Tensor, ...consts: tf.Tensor[]) => tf.Tensor, x: tf.Tensor, params: tf.Tensor[], consts: tf.Tensor[] = [], rng?: RngHooks): tf.Tensor {
  const before = rng?.save();
  const op = tf.customGrad(((...args: unknown[]) => {
    const save = args[args.length - 1] as tf.GradSaveFunc;
    const input = args[0] as tf.Tensor;
    save([input, ...consts]);
    return {
      value: f(input, ...consts),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const eng = tf.engine() as unknown as EngineState;
        // The backward pass is walking the outer tape; a gradient computation started here
        // replaces the engine's active tape and then clears it (tfjs frees the saved tensors of
        // a tape when gradients return at depth 0), so the outer one is put back afterwards.
        const outer = eng.state.activeTape;
        const after = rng?.save();
        if (rng) rng.restore(before);
        try {
          const xs = [saved[0], ...params];
          const { value, grads } = eng.gradients(() => f(saved[0], ...saved.slice(1)), xs, dy);
          value.dispose();
          // A tensor f does not read (a bias of a layer that is cut off) has no gradient.
          return grads.map((g, i) => g ?? tf.zerosLike(xs[i]));
        } finally {
          eng.state.activeTape = outer;
          if (rng) rng.restore(after);
        }
      },
    };
  }) as any) as (...ts: tf.Tensor[]) => tf.Tensor;
  return op(x, ...params);
}
