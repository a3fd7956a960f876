"""What holding back a character split over tokens costs the text stream, per generated token.

TextStream.add decoded the row's tokens so far (since ce40f06 a window of the last ones: studies.textstream_window)
and gives out the new piece; since 94c4152 it holds back a trailing
U+FFFD (a byte-level BPE character whose last byte has not come) until the next token completes it. This times
add() as it is against the rule before (no hold-back; no stop strings in either), on the deployment's tokenizer and
the first 32 tokens of a sentence with an accent and an emoji, median of `--repeats` streams, in alternating rounds.

    python -m studies.textstream_cost DEPLOY [--rounds 3] [--repeats 300] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

TEXT = "The striker scored twice as the home side won the cup final in extra time, and the crowd sang é 😀."


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.textstream_cost", description=__doc__.split("\n")[0])
    p.add_argument("deploy")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from promptmux.bench.machine import machine_info
    from promptmux.runtime.generate import TextStream
    from promptmux.runtime.text import load_tokenizer

    tok = load_tokenizer(args.deploy)
    ids = tok(TEXT)["input_ids"][:32]

    class Before(TextStream):  # add() without the hold-back, and without stop strings (none are given here)
        def add(self, token: int) -> str:
            self.tokens.append(token)
            text = self.tok.decode(self.tokens, skip_special_tokens=True)
            end = max(self.shown, len(text) - self.hold)
            piece, self.shown = text[self.shown:end], end
            return piece

    def per_token(cls) -> float:
        times = []
        for _ in range(args.repeats):
            stream = cls(tok)
            start = time.perf_counter()
            for i in ids:
                stream.add(i)
            times.append((time.perf_counter() - start) / len(ids))
        return statistics.median(times)

    rounds = []
    for _ in range(args.rounds):
        before, after = per_token(Before), per_token(TextStream)
        rounds.append({"before_us": round(before * 1e6, 2), "after_us": round(after * 1e6, 2),
                       "ratio": round(after / before, 3)})
    def streamed(cls) -> str:
        stream = cls(tok)
        return "".join(stream.add(i) for i in ids) + stream.flush()

    whole = tok.decode(ids, skip_special_tokens=True)
    result = {"command": "python -m studies.textstream_cost " + " ".join(sys.argv[1:] if argv is None else argv),
              "tokens": len(ids), "machine": machine_info(1), "rounds": rounds,
              "median_added_us_per_token": round(statistics.median(r["after_us"] - r["before_us"] for r in rounds), 2),
              "streams_the_decoded_text": {"before": streamed(Before) == whole, "after": streamed(TextStream) == whole}}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
