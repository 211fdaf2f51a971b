#!/usr/bin/env python3
"""Train a prefopt DPO job with TRL (docs/REFERENCE.md §13), for a stage's
`trainer: {type: command, run: "accelerate launch scripts/trl-dpo.py {model} {adapter} {data} {config} {out}"}`.

Reads what prefopt hands a trainer command: the base checkpoint, the PEFT adapter to start from,
the pairs (TRL's prompt/chosen/rejected text), and config.json (TRL's DPOConfig names under
`dpo_config`, PEFT's LoraConfig under `lora_config`, the rest under `prefopt`); leaves a PEFT
adapter in OUT. Needs torch, transformers, peft and trl. TRL tokenizes the text itself (it adds
its own EOS), so its pairs can differ from prefopt's token ids by that; the arithmetic is TRL's.
Written against TRL's documented API; prefopt's own tests run `prefopt dpo --config` instead.
"""
import dataclasses
import json
import sys


def main(model_dir, adapter_dir, data, config, out):
    import torch
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    with open(config) as f:
        cfg = json.load(f)
    own = cfg.get("prefopt", {})
    known = {f.name for f in dataclasses.fields(DPOConfig)}
    args = {k: v for k, v in cfg["dpo_config"].items() if k in known}
    dropped = sorted(set(cfg["dpo_config"]) - known)
    if dropped:
        print(f"trl-dpo: this TRL has no {', '.join(dropped)}; left out", file=sys.stderr)
    if own.get("reference") == "start_adapter":
        # The reference is the base plus the starting adapter: a second, frozen copy of it.
        args.update(model_adapter_name="train", ref_adapter_name="reference")
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    dpo_args = DPOConfig(output_dir=out, bf16=bf16, report_to=[], **args)

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16 if bf16 else torch.float32)
    name = "train" if own.get("reference") == "start_adapter" else "default"
    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name=name, is_trainable=True)
    if name == "train":
        model.load_adapter(adapter_dir, adapter_name="reference")

    columns = ["prompt", "chosen", "rejected"]
    train = load_dataset("json", data_files=data, split="train").select_columns(columns)
    evald = load_dataset("json", data_files=own["eval_data"], split="train").select_columns(columns) if own.get("eval_data") else None
    trainer = DPOTrainer(model=model, ref_model=None, args=dpo_args, train_dataset=train, eval_dataset=evald, processing_class=tok)
    trainer.train()
    # PEFT's layout, the trained adapter only, at the top of OUT where prefopt looks for it.
    model.save_pretrained(out, selected_adapters=[name])
    if name != "default":
        import os
        import shutil

        for f in os.listdir(os.path.join(out, name)):
            shutil.move(os.path.join(out, name, f), os.path.join(out, f))


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit("usage: trl-dpo.py MODEL ADAPTER DATA CONFIG OUT")
    main(*sys.argv[1:])
