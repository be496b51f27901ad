"""``python -m symattn_kernels.info``: print versions, how the compiled kernels are obtained and
the backend table."""

import argparse

from .diagnostics import format_info, info

if __name__ == "__main__":
    argparse.ArgumentParser(
        prog="python -m symattn_kernels.info",
        description="Versions, how the compiled kernels reach this process (prebuilt, just-in-time or absent), "
                    "the CPU kernel set and, per backend, whether it runs here and why not. Compiles nothing.",
    ).parse_args()
    print(format_info(info()))
