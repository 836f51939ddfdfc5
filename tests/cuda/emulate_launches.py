"""Rewrite the kernel launches of csrc/cuda/*.cu into host C++ for the launch emulation.

    python tests/cuda/emulate_launches.py SOURCE_DIR BUILD_DIR

Writes BUILD_DIR/<name>.cpp for each SOURCE_DIR/<name>.cu, with every
`kernel<<<grid, kThreads, 0, stream>>>(args)` turned into
`kernel | ::emu::Grid(dim3(grid), stream).args(args)`,
which tests/cuda/launch_emulation.h runs block by block on the CPU; nothing else changes, so
the kernels and launch_* functions compiled there are the ones in csrc. Fails (exit status 1,
naming the file) when a `<<<` is left that this form does not cover (dynamic shared memory,
another block size): a new launch must be emulated, or this test must learn it, not skip it.
"""

import re
import sys
from pathlib import Path

# The emulator runs kThreads threads a block and no dynamic shared memory; the grid is the part
# before ", kThreads" (it may hold commas itself, as dim3(a, b) would).
LAUNCH = re.compile(r"<<<\s*(?P<grid>.+?)\s*,\s*kThreads\s*,\s*0\s*,\s*stream\s*>>>\s*\(", re.DOTALL)


def rewrite(text: str) -> tuple[str, int]:
    return LAUNCH.subn(lambda m: f" | ::emu::Grid(dim3({m['grid']}), stream).args(", text)


def main(source_dir: Path, build_dir: Path) -> int:
    sources = sorted(source_dir.glob("*.cu"))
    if not sources:
        print(f"emulate_launches.py: no .cu file in {source_dir}", file=sys.stderr)
        return 1
    build_dir.mkdir(parents=True, exist_ok=True)
    status = 0
    for source in sources:
        text = source.read_text()
        rewritten, launches = rewrite(text)
        left = rewritten.count("<<<")
        if left:
            print(
                f"emulate_launches.py: {source.name}: {left} launch(es) not of the form "
                "kernel<<<grid, kThreads, 0, stream>>>(args) that the emulation runs",
                file=sys.stderr,
            )
            status = 1
        print(f"{source.name}: {launches} launch(es) rewritten")
        # diagnostics and debuggers point at the original file (the rewrite keeps its lines)
        (build_dir / f"{source.stem}.cpp").write_text(f'#line 1 "{source.resolve()}"\n{rewritten}')
    return status


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
