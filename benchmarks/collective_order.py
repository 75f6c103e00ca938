"""Counts the collectives in compiled XLA programs and the pairs of them that XLA:CPU may run in either order.

XLA:CPU's thunk executor orders the collectives of one computation among themselves, but not a loop or conditional
that holds collectives against the computation's other collectives: when no data path orders the two, each device
runs whichever is ready first, and a device waiting in one for devices waiting in the other hangs forever. The
8 emulated devices of the tests hit this in CI (docs/experiments/ci_hang.md). This script reads an HLO text dump
and reports, per module, the collectives by kind and the number of such unordered pairs over all computations
(0: the hang cannot happen).

  XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*(generator_step|critic_step).*" \
      python -m pytest -q tests/test_full_scale_job.py -k runs_from_local
    python benchmarks/collective_order.py /tmp/hlo
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
_CALLEE = re.compile(r"(?:condition|body|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def parse(text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines."""
    computations, current = {}, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
        elif line.startswith("}"):
            current = None
        elif current and line.strip().startswith(("%", "ROOT")):
            computations[current].append(line.strip())
    return computations


def _name(instruction: str) -> str:
    return re.match(r"(?:ROOT )?%?([\w.\-]+) =", instruction).group(1)


def _opcode(instruction: str) -> str:
    """The first word followed by "(" after the "=": the result type before it has none (tuple types open with a
    bare parenthesis)."""
    found = re.search(r"(?:^|\s)([a-z][a-z0-9\-]*)\(", instruction.split("=", 1)[1])
    return found.group(1) if found else ""


def _callees(instruction: str) -> list[str]:
    names = _CALLEE.findall(instruction)
    for group in _BRANCHES.findall(instruction):
        names += [n.strip().lstrip("%") for n in group.split(",")]
    return names


def _operands(instruction: str) -> set[str]:
    rhs = instruction.split("=", 1)[1]
    call = rhs.split("), ", 1)[0]  # the operand list; attributes (metadata, callees) follow it
    return set(re.findall(r"%([\w.\-]+)", call)) - {_name(instruction)}


def unordered_pairs(computations: dict[str, list[str]]) -> int:
    """Pairs (a loop/conditional/call holding collectives, another collective or such op) of one computation with
    no data path between them, summed over computations."""
    holds: dict[str, bool] = {}

    def holds_collective(name: str) -> bool:
        if name not in holds:
            holds[name] = False  # breaks cycles
            holds[name] = any(
                _opcode(i).removesuffix("-start") in COLLECTIVES
                or any(holds_collective(c) for c in _callees(i) if c in computations)
                for i in computations.get(name, ())
            )
        return holds[name]

    total = 0
    for instructions in computations.values():
        deps = {_name(i): _operands(i) for i in instructions}
        nested = [
            _name(i)
            for i in instructions
            if _opcode(i) in ("while", "conditional", "call")
            and any(holds_collective(c) for c in _callees(i) if c in computations)
        ]
        direct = [_name(i) for i in instructions if _opcode(i).removesuffix("-start") in COLLECTIVES]
        ancestors: dict[str, set[str]] = {}

        def above(node: str, deps=deps, ancestors=ancestors) -> set[str]:
            if node not in ancestors:
                seen, stack = set(), [node]
                while stack:
                    for dep in deps.get(stack.pop(), ()):
                        if dep not in seen:
                            seen.add(dep)
                            stack.append(dep)
                ancestors[node] = seen
            return ancestors[node]

        ops = nested + direct
        for i, a in enumerate(nested):
            for b in ops[i + 1 :]:
                total += a not in above(b) and b not in above(a)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dump_dir", type=pathlib.Path)
    args = parser.parse_args()
    files = sorted(args.dump_dir.glob("*after_optimizations.txt"))
    if not files:
        raise SystemExit(f"error: no '*after_optimizations.txt' HLO dumps in {args.dump_dir} (see --help)")
    print(f"{'module':<58} " + " ".join(f"{k:>18}" for k in COLLECTIVES) + f" {'unordered pairs':>16}")
    for path in files:
        computations = parse(path.read_text())
        counts = collections.Counter(_opcode(i).removesuffix("-start") for body in computations.values() for i in body)
        print(
            f"{path.name[:58]:<58} "
            + " ".join(f"{counts[k]:>18}" for k in COLLECTIVES)
            + f" {unordered_pairs(computations):>16}"
        )


if __name__ == "__main__":
    main()
