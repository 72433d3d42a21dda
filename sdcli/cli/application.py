"""The Typer app and the console entry point: argv in, one line on stderr and an exit code for every mistake."""

from __future__ import annotations

import errno
import sys

import typer

from sdcli.errors import SdcliError, printable

app = typer.Typer(
    name="sdcli",
    help="Stable Diffusion (latent diffusion) from the command line.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts hold literal [brackets]
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _optional_values(args: list[str]) -> list[str]:
    """Give an option of batch.OPTIONAL_VALUES its value where no number follows it (typer has no options
    with optional values)."""
    from sdcli.batch import OPTIONAL_VALUES

    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        key = arg.removeprefix("--").replace("-", "_")
        if arg.startswith("--") and key in OPTIONAL_VALUES and not (i + 1 < len(args) and args[i + 1].isdigit()):
            out.append(OPTIONAL_VALUES[key])
    return out


_STREAM_ERRORS = (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EDQUOT, errno.EFBIG)


def _short(message: str, limit: int = 2000) -> str:
    """A message cut in the middle past `limit` characters: what it echoes (a 10 MB tensor name) is the file's."""
    return message if len(message) <= limit else f"{message[:limit // 2]} ... {message[-limit // 2:]}"


def main() -> None:
    """Console entry point: every mistake of the user's is one line on stderr and exit code 2."""
    from sdcli.fileio import write_stdout
    from sdcli.runtime import keep_freed_memory

    keep_freed_memory()  # before any model runs: see sdcli.runtime
    args = _optional_values(sys.argv[1:]) or ["--help"]  # a bare `sdcli` shows the help
    try:
        code = app(args, prog_name="sdcli", standalone_mode=False)
        write_stdout("")  # what is still buffered (help, info), while a failure can be reported
    except (KeyboardInterrupt, typer.Abort):
        print("sdcli: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as e:  # unknown option or command, bad value, missing argument
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx else ""
        message = (e.format_message() if hasattr(e, "format_message") else str(e)).replace("Value error, ", "")
        print(f"sdcli: error: {printable(' '.join(message.split()))}{hint}", file=sys.stderr)  # one line, always
        sys.exit(getattr(e, "exit_code", 2))
    except OSError as e:
        if e.filename is not None or e.errno not in _STREAM_ERRORS:
            raise  # not the user's stdout: a bug, with its traceback
        print(f"sdcli: error: cannot write to stdout: {e.strerror}", file=sys.stderr)  # `sdcli --help > /dev/full`
        sys.exit(2)
    except SdcliError as e:  # one line, even for odd paths; what it echoes from files cannot drive the terminal
        print(f"sdcli: error: {_short(printable(str(e).replace(chr(10), ' ')))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (MemoryError, RuntimeError) as e:  # torch's "can't allocate memory" / CUDA's OutOfMemoryError
        if not isinstance(e, MemoryError) and not any(s in str(e) for s in ("allocate memory", "out of memory")):
            raise
        print("sdcli: error: out of memory: lower -W/-H, --batch-size or --resolution, or pass --vae-tiling",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)

