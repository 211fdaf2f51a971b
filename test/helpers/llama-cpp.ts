import { LlamaLogLevel, getLlama, type Llama, type LlamaModel } from 'node-llama-cpp';

/**
 * llama.cpp itself (node-llama-cpp's prebuilt CPU binary) as the independent reader of prefopt's
 * GGUF files. Contexts keep their KV cache in f32 and attention unfused, so an f32 export can be
 * compared with prefopt's f32 forward pass token for token.
 */
let llama: Promise<Llama> | null = null;
export function llamaCpp(): Promise<Llama> {
  llama ??= getLlama({ gpu: false, build: 'never', logLevel: LlamaLogLevel.error, progressLogs: false });
  return llama;
}

export async function loadGguf(file: string): Promise<LlamaModel> {
  return (await llamaCpp()).loadModel({ modelPath: file });
}

async function context(model: LlamaModel, lora?: string) {
  return model.createContext({
    contextSize: 256,
    // Left to node-llama-cpp, a context here waited ~0.3 s per token for threads (7 ms when set).
    threads: (await llamaCpp()).cpuMathCores,
    flashAttention: false,
    experimentalKvCacheKeyType: 'F32',
    experimentalKvCacheValueType: 'F32',
    ...(lora ? { lora: { adapters: [{ filePath: lora }] } } : {}),
  });
}

/** llama.cpp's greedy continuation of `prompt`, `n` tokens (it does not stop at end-of-sequence tokens). */
export async function greedy(model: LlamaModel, prompt: number[], n: number, lora?: string): Promise<number[]> {
  const ctx = await context(model, lora);
  try {
    const out: number[] = [];
    for await (const t of ctx.getSequence().evaluate(prompt as any, { temperature: 0 })) {
      out.push(t as number);
      if (out.length >= n) break;
    }
    return out;
  } finally {
    await ctx.dispose();
  }
}

/** log p(ids[i] | ids[<i]) for i ≥ `from`, from llama.cpp's full softmax (temperature 1, no truncation). */
export async function logps(model: LlamaModel, ids: number[], from: number, lora?: string): Promise<number[]> {
  const ctx = await context(model, lora);
  try {
    const items = ids.slice(0, -1).map((t, i) => (i >= from - 1 ? ([t, { generateNext: { probabilities: true, options: { temperature: 1, topK: 0, topP: 1, minP: 0 } } }] as any) : t));
    const res = await ctx.getSequence().controlledEvaluate(items);
    const out: number[] = [];
    for (let i = from - 1; i < ids.length - 1; i++) {
      const probs = res[i]?.next?.probabilities;
      if (!probs) throw new Error(`llama.cpp returned no probabilities at position ${i}`);
      out.push(Math.log(probs.get(ids[i + 1] as any) ?? 0));
    }
    return out;
  } finally {
    await ctx.dispose();
  }
}
