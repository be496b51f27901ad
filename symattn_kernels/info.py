"""``python -m symattn_kernels.info``: print versions and the backend table."""

from .diagnostics import format_info, info

if __name__ == "__main__":
    print(format_info(info()))
