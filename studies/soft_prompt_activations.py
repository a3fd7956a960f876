"""Where a prompt-tuned decoder's activations are largest, at the input of every Linear layer of PEFT fp32 (forward
hooks, one forward of each task's first held-out prompts), with its soft prompt and with the adapter disabled: the
largest value of any position, where it sits, and the median over the text's positions of each position's largest
value. Where one position is far above the rest, one activation scale per tensor (PyTorch's dynamic int8; ONNX
Runtime's dynamic int8, per batch) is set by it and leaves the others few levels. Written for the SmolLM2 demo,
where PyTorch's int8 loses both tasks (results/decoder-labelled-contract-peft-int8-smollm2-amd-zen4.json).

    python -m studies.soft_prompt_activations DEPLOY [--rows 8] [--top 8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.soft_prompt_activations", description=__doc__.split("\n")[0])
    p.add_argument("deploy")
    p.add_argument("--rows", type=int, default=8, help="held-out prompts per task")
    p.add_argument("--top", type=int, default=8, help="layers listed per task, largest ratio first")
    p.add_argument("--out")
    args = p.parse_args(argv)

    import torch

    from promptmux import Runtime
    from promptmux.bench.baseline import PeftSystem
    from promptmux.bench.machine import machine_info
    from promptmux.demo.smollm2 import calibration_prompts

    exact = Runtime(args.deploy, backend="onnxruntime")
    assert not exact.spec.family.classifies, "written for a language model's deployment (the SmolLM2 demo)"
    peft = PeftSystem(exact, exact.bank.names())
    every = calibration_prompts(per_task=args.rows)
    assert every, "the SmolLM2 held-out data is not here (see promptmux.demo.smollm2.held_out)"
    tasks = {}
    for task in exact.bank.names():
        virtual = exact.bank.view(task).num_virtual_tokens
        model, kwargs = peft.model_for(task)
        texts = [r["text"] for r in every if r["task"] == task]
        enc = exact.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        tasks[task] = {"rows": len(texts), "virtual_tokens": virtual}
        for prompted in (True, False):  # with the soft prompt in front, and the base model on the text alone
            seen: dict[str, tuple[float, float, float]] = {}
            skip = virtual if prompted else 0
            mask = enc["attention_mask"].bool()  # left padding; PEFT puts the virtual positions before it
            full = torch.cat([torch.ones(len(texts), skip, dtype=torch.bool), mask], 1)

            def hook(name):
                def record(module, inputs, output):
                    each = inputs[0].detach().float().abs().amax(-1)  # each position's largest value, rows x positions
                    each[~full] = 0
                    at = int(each.amax(0).argmax())  # the position (within the rows) where the largest value sits
                    where = f"virtual {at}" if at < skip else f"text position {at - skip} (padding included)"
                    seen[name] = (each.amax().item(), where, each[:, skip:][mask].median().item())
                return record

            handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear)]
            with torch.inference_mode():
                if prompted:
                    model(**enc, **kwargs)
                else:
                    with model.disable_adapter():
                        model(**enc)
            for h in handles:
                h.remove()
            ranked = sorted(seen.items(), key=lambda kv: kv[1][0] / kv[1][2], reverse=True)
            tasks[task]["with_soft_prompt" if prompted else "without"] = {
                "linear_layers": len(seen),
                "layers": [{"layer": n.removeprefix("base_model.model."), "largest": round(top, 2), "at": where,
                            "text_positions_median": round(median, 3), "largest_over_median": round(top / median, 1)}
                           for n, (top, where, median) in ranked[:args.top]]}
        print(task, json.dumps({k: v["layers"][:2] for k, v in tasks[task].items() if isinstance(v, dict)}),
              flush=True)
    given = sys.argv[1:] if argv is None else argv
    result = {"command": "python -m studies.soft_prompt_activations " + " ".join(given),
              "machine": machine_info(torch.get_num_threads()), "tasks": tasks}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
