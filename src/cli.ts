import { Command, Option } from 'commander';
import * as tf from '@tensorflow/tfjs-core';
import * as os from 'node:os';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fusedActive } from './engine/fused.js';
import { gpuReport, initBackend } from './engine/backend.js';
import { cudaReport } from './engine/cuda.js';
import { UserError } from './util/errors.js';
import { loadConfig } from './io/checkpoint.js';
import { gib, jobReports, paramCount } from './model/memory.js';
import { log, setLogMode } from './util/log.js';
import { generateCmd, initModel, logprobsCmd, trainTokenizer } from './commands/model.js';
import { addLoraOptions, addTableOptions, addTrainOptions, int, num } from './commands/train-options.js';
import { trainConfigFrom } from './train/options.js';
import { valuesFrom } from './util/schema.js';
import { DPO_OPTIONS } from './dpo/loss.js';
import { PAIR_OPTIONS, PAIR_SHAPE_OPTIONS } from './data/prefs.js';
import { OptionRow } from './util/schema.js';
import { DEFAULT_SFT, SFT_OPTIONS, runSft, sftSettingsFrom } from './stages/sft.js';
import { dpoCmd, evalDpoCmd } from './commands/dpo.js';
import { rmScoreCmd, rmTrainCmd } from './commands/rm.js';
import { DEFAULT_RM } from './stages/rm.js';
import { exportPairsCmd, onlineCmd, statusCmd } from './commands/online.js';
import { DEFAULT_ONLINE, ONLINE_OPTIONS } from './stages/online.js';
import { SAMPLING_OPTIONS } from './infer/sampling.js';
import { LORA_OPTIONS } from './lora/lora.js';
import { DEFAULT_MAKE_DATA, makeData } from './quickstart/make-data.js';
import { KINDS } from './quickstart/task.js';
import { ARCHS } from './model/config.js';
import { chatCmd, serveCmd } from './commands/serve.js';
import { writeReport } from './report/report.js';
import { mergeLora, parseMergeConfig, runMerge } from './merge/merge.js';
import { DEFAULT_GGUF, GGUF_OPTIONS, exportGguf } from './gguf/export.js';
import { STAGE_TYPES, loadRecipe } from './recipe/recipe.js';
import { fieldsMarkdown } from './recipe/fields.js';
import { DATA_KINDS, tokenizeCmd } from './commands/tokenize.js';
import { RecipeRunner, formatTable } from './recipe/run.js';


/**
 * The `prefopt` command line. Each command parses its flags and hands a plain options object to
 * a function in src/commands; recipes call the same functions.
 */
const collect = (v: string, prev: string[]) => [...prev, v];

/** The sampling flags of generate and chat; unset ones fall back to the checkpoint's generation_config. */
function addSamplingOptions(cmd: Command, maxNewTokens: number): Command {
  return addTableOptions(cmd.option('--max-new-tokens <n>', 'tokens to generate at most', int, maxNewTokens), SAMPLING_OPTIONS);
}

/** The DPO loss flags and the pair table's (all of it, or only its length and batch rows). */
function dpoOptions(cmd: Command, pairs: OptionRow<string>[] = PAIR_OPTIONS): Command {
  return addTableOptions(addTableOptions(cmd, DPO_OPTIONS), pairs);
}

/** float32 bytes of the checkpoint a command will load, from its config alone (0 when unreadable: the command reports why). */
function weightBytesOf(...dirs: unknown[]): number {
  let most = 0;
  for (const d of dirs) {
    if (typeof d !== 'string' || !fs.existsSync(path.join(d, 'config.json'))) continue;
    try {
      most = Math.max(most, 4 * paramCount(loadConfig(d)));
    } catch {
      // A bad config.json is the command's to report, with its file name.
    }
  }
  return most;
}

/** Wrap a command action: logging mode, then the backend (passing over wasm for large models), then the action. */
function backendWrapper(program: Command) {
  return <A extends any[]>(fn: (...args: A) => Promise<void>) =>
    async (...args: A) => {
      const g = program.opts();
      setLogMode({ json: g.json, quiet: g.quiet });
      const b = await initBackend(g.backend, weightBytesOf(args[0]?.model));
      if (b.warning) log('warning', {}, b.warning);
      await fn(...args);
    };
}

type WithBackend = ReturnType<typeof backendWrapper>;

/** The machine: backends, kernels, GPU status, memory estimates. */
function addDoctorCommand(program: Command, withBackend: WithBackend): void {
  program
    .command('doctor')
    .description('show the tfjs backend chosen and why, and the machine; with --model, the peak memory of jobs on it')
    .option('--model <dir>', 'checkpoint to estimate log-probs, LoRA DPO and full SFT memory for')
    .option('--batch-size <n>', 'pairs per step (rows for SFT) in the estimates', int, 4)
    .option('--max-length <n>', 'tokens per sequence in the estimates', int, 512)
    .option('--lora-r <n>', 'LoRA rank in the estimate', int, 16)
    .action(
      withBackend(async (o) => {
        const b = await initBackend(program.opts().backend);
        const mem = o.model ? jobReports(o.model, { pairs: o.batchSize, maxLength: o.maxLength, loraR: o.loraR }) : null;
        const report = {
          backend: b.chosen,
          tfjs_backend: b.tfName,
          requested: b.requested ?? null,
          tried: b.tried,
          warning: b.warning ?? null,
          wasm_simd: b.chosen === 'wasm' ? tf.env().getBool('WASM_HAS_SIMD_SUPPORT' as any) : null,
          wasm_threads: b.chosen === 'wasm' ? tf.env().getBool('WASM_HAS_MULTITHREAD_SUPPORT' as any) : null,
          native_matmul: b.native.active && (b.chosen === 'wasm' || b.chosen === 'native' || b.chosen === 'cpu') ? { kernel: b.native.kernel, library: b.native.library ?? null, threads: b.native.threads, isa: b.native.isa } : null,
          native_reason: b.native.reason,
          fused_kernels: fusedActive(),
          gpu: gpuReport(b),
          cuda: cudaReport(),
          node: process.version,
          cpus: os.cpus().length,
          memory_gb: +(os.totalmem() / 2 ** 30).toFixed(1),
          memory: mem,
        };
        if (program.opts().json) process.stdout.write(JSON.stringify(report) + '\n');
        else {
          process.stdout.write(`backend: ${report.backend} (tfjs "${report.tfjs_backend}")${report.requested ? ` — requested "${report.requested}"` : ''}\n`);
          for (const t of b.tried) process.stdout.write(`  ${t.ok ? 'ok  ' : 'skip'} ${t.name}: ${t.reason}\n`);
          if (report.wasm_simd !== null) process.stdout.write(`wasm: simd=${report.wasm_simd} threads=${report.wasm_threads}\n`);
          if (b.chosen === 'wasm' || b.chosen === 'native' || b.chosen === 'cpu') {
            process.stdout.write(`matmul: ${report.native_matmul ? `native, ${b.native.reason}, ${b.native.threads} threads` : `tfjs ${b.chosen} kernel — ${b.native.reason}`}\n`);
            process.stdout.write(`fused kernels (attention, RMSNorm, SwiGLU, rotary, loss): ${report.fused_kernels ? 'native' : b.native.active ? 'off (PREFOPT_FUSED=0): tfjs compositions' : 'tfjs compositions'}\n`);
          }
          const g = report.gpu;
          process.stdout.write(`gpu: ${g.status}\n  nvidia driver: ${g.nvidia_driver ?? 'none'}; @tensorflow/tfjs-node-gpu: ${g.tfjs_node_gpu}\n`);
          process.stdout.write(`cuda: ${report.cuda.state} — ${report.cuda.reason}\n`);
          if (report.warning) process.stdout.write(`warning: ${report.warning}\n`);
          process.stdout.write(`node ${report.node}, ${report.cpus} cpus, ${report.memory_gb} GiB\n`);
          if (mem) {
            const held = mem.halfWeights ? '; frozen matrices held in the file\'s 16 bits' : '';
            process.stdout.write(`\npeak memory on ${o.model} (${(mem.params / 1e6).toFixed(1)}M parameters, ${o.batchSize} × ${o.maxLength} tokens; limit ${gib(mem.limit)}, ${mem.limitSource}${held}):\n`);
            for (const j of mem.jobs) {
              const parts = Object.entries(j.parts).map(([k, v]) => `${k} ${gib(v)}`).join(', ');
              process.stdout.write(`  ${j.fits ? 'fits' : 'TOO BIG'}  ${j.job}${j.checkpointing ? ', checkpointed' : ''}: ${gib(j.bytes)} (${parts})\n`);
            }
          }
        }
      }),
    );
}

/** Tokenizers, checkpoints, log-probs and sampling. */
function addModelCommands(program: Command, withBackend: WithBackend): void {
  program
    .command('train-tokenizer')
    .description('train a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json)')
    .requiredOption('--data <files...>', 'text, JSON or JSONL files')
    .requiredOption('--out <dir>', 'output directory')
    .option('--vocab-size <n>', 'vocabulary size including special tokens', int, 1024)
    .action(withBackend(async (o) => trainTokenizer({ data: o.data, vocabSize: o.vocabSize, out: o.out })));

  program
    .command('init-model')
    .description('create a randomly initialised checkpoint')
    .requiredOption('--arch <arch>', ARCHS.join(', '))
    .option('--preset <name>', 'tiny, 5m or zhinao2-7b')
    .option('--config <file>', 'JSON with hidden_size, intermediate_size, num_hidden_layers, … instead of a preset')
    .requiredOption('--tokenizer <dir>', 'directory with tokenizer.json')
    .requiredOption('--out <dir>', 'output checkpoint directory')
    .option('--seed <n>', 'seed', int, 0)
    .option('--dtype <d>', 'f32 | f16 | bf16', 'f32')
    .option('--max-shard-size <bytes>', 'split the weights into shards of at most this size (5GB, 2GiB), with an index as transformers writes')
    .action(
      withBackend(async (o) => {
        if (!o.preset === !o.config) throw new UserError('give exactly one of --preset or --config');
        await initModel(o);
      }),
    );

  program
    .command('logprobs')
    .description('Σ log p(completion | prompt) per row of a JSONL file')
    .requiredOption('--model <dir>', 'checkpoint directory')
    .option('--adapter <dir>', 'PEFT LoRA adapter directory')
    .requiredOption('--input <file>', 'JSONL rows {"prompt_ids","completion_ids"} or {"prompt","completion"}')
    .option('--out <file>', 'output JSONL (default stdout)')
    .option('--batch-size <n>', 'rows per forward pass', int, 8)
    .action(withBackend(async (o) => logprobsCmd(o)));

  const generate = program
    .command('generate')
    .description('sample completions with the KV cache')
    .requiredOption('--model <dir>', 'checkpoint directory')
    .option('--adapter <dir>', 'PEFT LoRA adapter directory')
    .option('--prompt <text>', 'user message (or raw text with --raw)')
    .option('--messages <file>', 'JSON list of {"role","content"} messages')
    .option('--raw', 'do not apply the chat format to --prompt')
    .option('--n <k>', 'samples', int, 1)
    .option('--stop <s>', 'stop string (repeatable)', collect, [])
    .option('--seed <n>', 'seed', int, 0);
  addSamplingOptions(generate, 128).action(withBackend(async (o) => generateCmd({ ...o, json: program.opts().json })));

  program
    .command('tokenize')
    .description('the token ids training will see: SFT {"input_ids","labels"} (-100 = not trained), pair and prompt ids; a marked preview on a terminal')
    .requiredOption('--model <dir>', 'checkpoint directory (only its tokenizer files and config.json are read)')
    .requiredOption('--data <file>', 'conversations, preference pairs or prompts (JSON or JSONL)')
    .addOption(new Option('--kind <kind>', 'what the rows are (default: from the first row\'s fields)').choices(DATA_KINDS))
    .option('--out <file>', 'output file (default stdout)')
    .option('--max-len <n>', `SFT: tokens per row, as \`prefopt sft --max-len\` (default ${DEFAULT_SFT.maxLen})`, int)
    .option('--is-concat', 'SFT: pack conversations as `prefopt sft --is-concat` does')
    .option('--max-length <n>', 'pairs: prompt + completion tokens at most, as `prefopt dpo --max-length`', int)
    .option('--max-prompt-length <n>', 'pairs: prompt tokens at most (longer prompts are skipped)', int)
    .option('--preview', 'readable text with trained tokens marked (default on a terminal)')
    .option('--jsonl', 'JSONL even on a terminal')
    .action((o) => {
      const g = program.opts();
      setLogMode({ json: g.json, quiet: g.quiet });
      tokenizeCmd({ ...o, preview: o.jsonl ? false : o.preview });
    });

}

/** The supervised and off-policy stages: SFT and DPO. */
function addSftDpoCommands(program: Command, withBackend: WithBackend): void {
  addTrainOptions(
    addTableOptions(
      program
        .command('sft')
        .description('full-parameter supervised fine-tuning on conversations (→ sft-base)')
        .requiredOption('--model <dir>', 'base checkpoint')
        .requiredOption('--data <file>', 'conversations: seed JSON/JSONL or {"messages": [...]} rows')
        .requiredOption('--out <dir>', 'output checkpoint (also holds checkpoint-N/ and metrics.jsonl)')
        .option('--eval-data <file>', 'held-out conversations (default: --eval-ratio of --data)'),
      SFT_OPTIONS,
    ),
  ).action(
    withBackend(async (o) => {
      const res = await runSft({
        ...DEFAULT_SFT,
        model: o.model,
        data: o.data,
        out: o.out,
        evalData: o.evalData,
        ...sftSettingsFrom(o, 'flags'),
        resume: !!o.resume,
        train: trainConfigFrom(o, DEFAULT_SFT.train),
      });
      log('sft-done', { out: o.out, steps: res.steps, loss: res.lastLoss ?? NaN, eval_loss: res.evalLoss ?? NaN, skipped: res.skipped, dropped: res.dropped });
    }),
  );


  addTrainOptions(
    addLoraOptions(dpoOptions(
      program
        .command('dpo')
        .description('off-policy DPO with LoRA adapters (writes a PEFT adapter directory)')
        .requiredOption('--model <dir>', 'base checkpoint (e.g. sft-base), frozen')
        .requiredOption('--data <file>', 'preference pairs (TRL rows, conversations, or token ids)')
        .requiredOption('--out <dir>', 'output adapter directory (also holds checkpoint-N/ and metrics.jsonl)'),
    ))
      .option('--eval-data <file>', 'held-out pairs (default: --eval-ratio of --data)')
      .option('--ref-model <dir>', 'explicit reference checkpoint (default: the base with the adapter off)')
      .option('--adapter <dir>', 'start from this adapter')
      .option('--cache <db>', 'SQLite file for cached reference log-probs (default OUT/prefopt.db)')
      .option('--config <file>', "settings under TRL's DPOConfig and PEFT's LoraConfig names, as a trainer command gets them (flags override it)"),
  ).action(withBackend(async (o) => dpoCmd(o)));

  dpoOptions(
    program
      .command('eval-dpo')
      .description('DPO metrics of a policy on preference data; prints one JSON object')
      .requiredOption('--model <dir>', 'checkpoint')
      .option('--adapter <dir>', 'PEFT adapter (policy = model + adapter; reference = model)')
      .option('--ref-model <dir>', 'reference checkpoint')
      .requiredOption('--data <file>', 'preference pairs'),
    PAIR_SHAPE_OPTIONS,
  ).action(withBackend(async (o) => evalDpoCmd(o)));

}

/** Reward models and the on-policy rounds. */
function addRewardAndOnlineCommands(program: Command, withBackend: WithBackend): void {
  const rm = program.command('rm').description('reward models: train a Bradley–Terry model, score samples');
  addTrainOptions(
    addTableOptions(
      addLoraOptions(rm
        .command('train')
        .description('train a Bradley–Terry reward model (saved as …ForSequenceClassification)')
        .requiredOption('--model <dir>', 'backbone checkpoint (e.g. sft-base)')
        .requiredOption('--data <file>', 'preference pairs; an optional "margin" column')
        .requiredOption('--out <dir>', 'output reward-model checkpoint')
        .option('--eval-data <file>', 'held-out pairs')
        .option('--lora', 'train LoRA adapters (+ the score head) instead of all weights; merged on save')),
      PAIR_OPTIONS,
    ),
  ).action(withBackend(async (o) => rmTrainCmd(o, trainConfigFrom(o, DEFAULT_RM.train))));

  rm.command('score')
    .description('score {"prompt","completion"} rows; one {"reward": x} line per row, in order')
    .requiredOption('--scorer <spec>', 'model:DIR | module:PATH[#export] | http:URL | builtin:NAME')
    .requiredOption('--input <file>', 'JSONL rows')
    .option('--out <file>', 'output JSONL (default stdout)')
    .option('--concurrency <n>', 'requests in flight for http scorers', int)
    .option('--timeout <ms>', 'per-request timeout for http scorers', int)
    .action(withBackend(async (o) => rmScoreCmd(o)));

  const online = program
    .command('online')
    .description('iterative on-policy DPO: sample → score → pair → train, stored in SQLite, resumable')
    .requiredOption('--model <dir>', 'sft-base checkpoint (frozen; the policy is its LoRA adapter)')
    .option('--adapter <dir>', 'starting adapter (e.g. the off-policy DPO output)')
    .requiredOption('--prompts <file>', 'JSONL {"prompt": text | messages, ...}')
    .option('--eval-prompts <file>', 'held-out prompts evaluated after every round')
    .requiredOption('--scorer <spec>', 'model:DIR | module:PATH[#export] | http:URL | builtin:NAME')
    .option('--audit-scorer <spec>', 'a second scorer that only watches: its agreement with --scorer on each round\'s pairs is recorded')
    .requiredOption('--workdir <dir>', 'run directory (database, adapters per round)');
  for (const table of [ONLINE_OPTIONS, SAMPLING_OPTIONS, DPO_OPTIONS, LORA_OPTIONS]) addTableOptions(online, table);
  addTrainOptions(online)
    .option('--sampler-url <url>', 'OpenAI-compatible endpoint (vLLM) instead of local sampling')
    .option('--sampler-model <name>', 'model name at the endpoint ({round} is replaced by the round number)')
    .option('--sampler-concurrency <n>', 'requests in flight', int)
    .option('--sampler-timeout <ms>', 'per-request timeout', int)
    .option('--trainer-command <cmd>', 'train each round by this shell command ({model} {adapter} {data} {config} {out}; docs/REFERENCE.md §13)')
    .action(withBackend(async (o) => onlineCmd(o, trainConfigFrom(o, DEFAULT_ONLINE.train))));
}

/** Merging adapters and checkpoints. */
function addMergeCommands(program: Command, withBackend: WithBackend): void {
  program
    .command('merge-lora')
    .description('fold a LoRA adapter into its base: a plain HF checkpoint (W + s·B·A)')
    .requiredOption('--model <dir>', 'base checkpoint')
    .requiredOption('--adapter <dir>', 'PEFT adapter directory')
    .requiredOption('--out <dir>', 'output checkpoint')
    .option('--dtype <d>', 'f32 | f16 | bf16', 'f32')
    .action(
      withBackend(async (o) => {
        const r = await mergeLora(o.model, o.adapter, o.out, o.dtype);
        log('merge-lora', { out: o.out, tensors: r.tensors });
      }),
    );

  program
    .command('merge')
    .description('merge checkpoints mergekit-style (linear, task_arithmetic, ties, dare_ties, dare_linear, slerp)')
    .argument('<config>', 'mergekit-style YAML')
    .requiredOption('--out <dir>', 'output checkpoint')
    .action(
      withBackend(async (config: string, o) => {
        const r = await runMerge(parseMergeConfig(config), o.out, (p) => (path.isAbsolute(p) ? p : path.resolve(p)));
        log('merge', { out: o.out, method: r.method, models: r.models, tensors: r.tensors });
      }),
    );

  addTableOptions(
    program
      .command('export-gguf')
      .description("write a checkpoint (with an adapter folded in, or the adapter alone) as GGUF for llama.cpp, Ollama, LM Studio")
      .requiredOption('--model <dir>', 'checkpoint (llama, qwen2, qwen3; zhinao is written as qwen2 with q/k/v split)')
      .option('--adapter <dir>', 'PEFT LoRA adapter: folded into the weights, or written alone with --lora-only')
      .requiredOption('--out <file>', 'output .gguf file'),
    GGUF_OPTIONS,
  ).action(
    withBackend(async (o) => {
      const r = await exportGguf({ model: o.model, adapter: o.adapter, out: o.out, ...valuesFrom(GGUF_OPTIONS, o, { ...DEFAULT_GGUF }, 'flags') });
      log('export-gguf', { out: r.file, kind: r.kind, arch: r.arch, tensors: r.tensors, bytes: r.bytes });
    }),
  );
}

/** Chat and the OpenAI-compatible server. */
function addServingCommands(program: Command, withBackend: WithBackend): void {
  addSamplingOptions(
    program
      .command('chat')
      .description('chat in the terminal (tokens printed as generated; /clear, /exit)')
      .requiredOption('--model <dir>', 'checkpoint')
      .option('--adapter <dir>', 'PEFT adapter')
      .option('--system <text>', 'system message')
      .option('--seed <n>', 'seed', int, 0),
    256,
  ).action(withBackend(async (o) => chatCmd(o)));

  program
    .command('serve')
    .description('OpenAI-compatible server: POST /v1/chat/completions, GET /v1/models, GET /health')
    .requiredOption('--model <dir>', 'checkpoint')
    .option('--adapter <dir>', 'PEFT adapter')
    .option('--host <host>', 'address to bind', '127.0.0.1')
    .option('--port <n>', 'port (0 = any free one)', int, 8360)
    .option('--api-key <key>', 'require Authorization: Bearer KEY (or env PREFOPT_API_KEY)')
    .option('--concurrency <n>', 'requests generating at once', int, 1)
    .option('--max-queue <n>', 'requests waiting at most (then 429)', int, 64)
    .option('--max-body <bytes>', 'request body size limit', int, 1_000_000)
    .option('--timeout <ms>', 'per-request timeout', int, 300_000)
    .option('--name <id>', 'model id reported by /v1/models')
    .action(withBackend(async (o) => serveCmd(o)));
}

/** Data inspection, recipes, runs and their records. */
function addRunCommands(program: Command, withBackend: WithBackend): void {
  program
    .command('validate')
    .description('check a recipe; every problem is listed with its field path, expected and found value')
    .argument('<recipe>', 'recipe file (YAML or JSON)')
    .action(async (file: string) => {
      const r = loadRecipe(file);
      process.stdout.write(`${file}: ok (${r.stages.length} stages: ${r.stages.map((s) => `${s.name}/${s.type}`).join(' → ')})\n`);
    });

  program
    .command('fields')
    .description("every recipe field of each stage type: what it accepts and what it means (Markdown)")
    .argument('[type]', `one stage type (${STAGE_TYPES.join(', ')})`)
    .action((type?: string) => {
      if (type && !STAGE_TYPES.includes(type)) throw new UserError(`unknown stage type "${type}": expected one of ${STAGE_TYPES.join(', ')}`);
      process.stdout.write(fieldsMarkdown(type));
    });

  program
    .command('run')
    .description('run a recipe: stages in order, recorded in the run database; rerunning resumes')
    .argument('<recipe>', 'recipe file (YAML or JSON)')
    .option('--workdir <dir>', 'run directory (default: the recipe\'s workdir, else runs/<name>)')
    .option('--force', 'rerun from the first changed stage when the recipe changed')
    .action(async (file: string, o) => {
      const g = program.opts();
      setLogMode({ json: g.json, quiet: g.quiet });
      const recipe = loadRecipe(file);
      const models = recipe.stages.map((s: any) => (typeof s.model === "string" ? path.resolve(recipe.dir, s.model) : null));
      const b = await initBackend(g.backend ?? (recipe.backend && recipe.backend !== 'auto' ? recipe.backend : undefined), weightBytesOf(...models));
      if (b.warning) log('warning', {}, b.warning);
      log('run', { recipe: file, backend: b.chosen });
      const s = await new RecipeRunner(recipe, o).run();
      if (g.json) process.stdout.write(JSON.stringify(s) + '\n');
      else {
        process.stdout.write(`\nrun ${recipe.name}: ${s.stages.length} stages in ${s.seconds.toFixed(1)} s (${b.chosen}), workdir ${s.workdir}\n`);
        for (const st of s.stages) process.stdout.write(`  ${st.name.padEnd(12)} ${st.type.padEnd(11)} ${st.skipped ? 'skipped (done before)' : st.seconds.toFixed(1) + ' s'}\n`);
        if (s.table) process.stdout.write('\nheld-out evaluation\n' + formatTable(s.table) + '\n');
      }
      const report = await writeReport(s.workdir);
      log('report', { file: report });
    });

  program
    .command('report')
    .description('write report.html (loss curves, DPO metrics, reward per round, accuracy per model) for a run directory')
    .requiredOption('--workdir <dir>', 'run directory')
    .action(async (o) => {
      setLogMode({ json: program.opts().json, quiet: program.opts().quiet });
      process.stdout.write((await writeReport(o.workdir)) + '\n');
    });

  program
    .command('make-data')
    .description('generate the embedded default (bilingual task, tokenizer, model shape) deterministically')
    .option('--out <dir>', 'output directory', 'data/quickstart')
    .option('--seed <n>', 'seed', int, DEFAULT_MAKE_DATA.seed)
    .option('--sft <n>', 'SFT conversations', int, DEFAULT_MAKE_DATA.sft)
    .option('--prefs <n>', 'preference pairs', int, DEFAULT_MAKE_DATA.prefs)
    .option('--prompts <n>', 'on-policy prompts', int, DEFAULT_MAKE_DATA.prompts)
    .option('--eval <n>', 'held-out evaluation prompts', int, DEFAULT_MAKE_DATA.eval)
    .option('--noise <x>', 'fraction of SFT answers made wrong on purpose', num, DEFAULT_MAKE_DATA.noise)
    .option('--vocab-size <n>', 'tokenizer size', int, DEFAULT_MAKE_DATA.vocabSize)
    .option('--max-number <n>', 'numbers in questions run from 0 to this', int, DEFAULT_MAKE_DATA.maxNumber)
    .option('--kinds <list>', `question kinds: ${KINDS.join(',')}`, (v: string) => v.split(','), DEFAULT_MAKE_DATA.kinds)
    .option('--pref-kinds <list>', 'kinds the preference pairs cover (default: --kinds)', (v: string) => v.split(','), DEFAULT_MAKE_DATA.prefKinds)
    .action(
      withBackend(async (o) => {
        const counts = await makeData({ ...DEFAULT_MAKE_DATA, ...o });
        log('make-data', { out: o.out, ...counts });
      }),
    );

  program
    .command('status')
    .description('stages and rounds of a run directory, with counts and metrics')
    .requiredOption('--workdir <dir>', 'run directory')
    .action(async (o) => statusCmd({ workdir: o.workdir, json: program.opts().json }));

  program
    .command('export-pairs')
    .description('export stored pairs for TRL / OpenRLHF')
    .requiredOption('--workdir <dir>', 'run directory')
    .option('--round <n>', 'one round only', int)
    .option('--format <f>', 'trl | jsonl', 'trl')
    .option('--out <file>', 'output file (default stdout)')
    .action(async (o) => exportPairsCmd(o));
}

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('prefopt')
    .description('Preference optimization of language models: SFT, LoRA DPO, iterative on-policy DPO, merging')
    .option('--backend <name>', 'backend: node-gpu, node, wasm, native, cpu or cuda (default: first that loads; env PREFOPT_BACKEND; doctor says why each is or is not usable)')
    .option('--json', 'structured logs (one JSON object per line on stderr)')
    .option('--quiet', 'no logs')
    .showHelpAfterError();
  const withBackend = backendWrapper(program);
  addDoctorCommand(program, withBackend);
  addModelCommands(program, withBackend);
  addSftDpoCommands(program, withBackend);
  addRewardAndOnlineCommands(program, withBackend);
  addMergeCommands(program, withBackend);
  addServingCommands(program, withBackend);
  addRunCommands(program, withBackend);
  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  program.exitOverride();
  try {
    await program.parseAsync(argv);
    return 0;
  } catch (e: any) {
    if (e?.code?.startsWith?.('commander.')) return e.exitCode ?? 1;
    if (e instanceof UserError) {
      if (program.opts().json) process.stderr.write(JSON.stringify({ event: 'error', message: e.message }) + '\n');
      else process.stderr.write(`prefopt: error: ${e.message}\n`);
      return 2;
    }
    process.stderr.write(`prefopt: internal error: ${e?.stack ?? e}\n`);
    return 1;
  }
}
