"""What a streamed row's text costs per token as the row grows: TextStream decoding a window of the row's last
tokens (since ce40f06) against decoding the whole row at every token (the rule before it), on a deployment's
tokenizer. Rows of random token ids (a seeded generator, the vocabulary past its first 1,000 ids) of each
`--lengths`, medians of `--rounds` alternating rounds; both rules' streamed text is checked against the row's
decoded text.

    python -m studies.textstream_window DEPLOY [--lengths 32,512,4096] [--rounds 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.textstream_window", description=__doc__.split("\n")[0])
    p.add_argument("deploy")
    p.add_argument("--lengths", default="32,512,4096")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from promptmux.bench.machine import machine_info
    from promptmux.runtime.generate import TextStream
    from promptmux.runtime.text import load_tokenizer

    tok = load_tokenizer(args.deploy)

    class WholeRow(TextStream):  # the rule before: the whole row decoded at every token
        def add(self, token: int) -> str:
            self.tokens.append(token)
            text = self.tok.decode(self.tokens, skip_special_tokens=True)
            end = max(self.shown, min(len(text) - self.hold, len(text.rstrip("\ufffd"))))
            piece, self.shown = text[self.shown:end], end
            return piece

        def flush(self) -> str:
            text = self.tok.decode(self.tokens, skip_special_tokens=True)
            piece, self.shown = text[self.shown:], len(text)
            return piece

    def stream(cls, ids) -> tuple[float, str]:
        s, start = cls(tok), time.perf_counter()
        text = "".join(s.add(i) for i in ids) + s.flush()
        return (time.perf_counter() - start) / len(ids), text

    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        ids = np.random.default_rng(length).integers(1000, len(tok), length).tolist()
        whole = tok.decode(ids, skip_special_tokens=True)
        times = {"whole_row": [], "window": []}
        same = {}
        for _ in range(args.rounds):
            for name, cls in (("whole_row", WholeRow), ("window", TextStream)):
                seconds, text = stream(cls, ids)
                times[name].append(seconds)
                same[name] = text == whole
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"tokens": length, "whole_row_us_per_token": round(med["whole_row"] * 1e6, 2),
                     "window_us_per_token": round(med["window"] * 1e6, 2),
                     "speedup": round(med["whole_row"] / med["window"], 2), "streams_the_decoded_text": same})
    result = {"command": "python -m studies.textstream_window " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(1), "rounds": args.rounds, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
