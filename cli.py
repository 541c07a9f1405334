"""Command-line plumbing shared by the scripts: the bad-input exception, argument types, the common parser, progress
bars that suit a terminal and a log file, and the process set-up a script may choose (nothing here runs on import).

Library code raises UserError for bad input (a missing folder, pairs from another teacher, ...). Only a script's
entry point, `run(main)`, turns it into one line on stderr, "error: <the problem>: <the fix>", and exit code 2, so
the modules can be used from Python without the process ending.
"""
import argparse
import ctypes
import os
import sys

from tqdm import tqdm

from recipes import PRESETS, dataset_name


class UserError(Exception):
    """Bad input. The message names the problem and the fix, in one line."""


def run(main):
    """A script's entry point: UserError becomes one line on stderr and exit code 2, with no traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def number(kind, low, inclusive=False):
    """An argparse type: a number of `kind` above `low` (at or above it when `inclusive`)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a {kind.__name__}")
        if value < low or (value == low and not inclusive) or value != value:
            raise argparse.ArgumentTypeError(f"{text} must be {'>=' if inclusive else '>'} {low}")
        return value
    return parse


def script_parser(description):
    """Every script's parser: --dataset, --run-dir and --seed; errors are one line with exit code 2."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def error(msg):
        print(f"error: {msg} (see --help)", file=sys.stderr)
        sys.exit(2)
    p.error = error
    p.add_argument("--dataset", default=None, choices=[name for name in PRESETS if name != "custom"],
                   help="a preset (dataset, teacher, recipe); default mnist, or your own with --teacher (and --data-dir)")
    p.add_argument("--run-dir", default=None, help="run folder; default runs/<dataset> (runs/custom with --teacher)")
    p.add_argument("--seed", type=number(int, 0, inclusive=True), default=0, help="base seed (sample i uses seed+i)")
    return p


def parse(p):
    """Parse the command line and fill in --dataset's and --run-dir's defaults (recipes.dataset_name), saying so when
    a --teacher alone picked a preset."""
    args = p.parse_args()
    teacher = getattr(args, "teacher", None)
    name = dataset_name(args.dataset, teacher, getattr(args, "image_size", None))
    if teacher and not args.dataset and name != "custom":
        print(f"notice: teacher '{teacher}' was made for the {name} preset: running as --dataset {name} (its data, "
              f"recipe and run folder runs/{name} unless --run-dir)", file=sys.stderr)
    args.dataset = name
    args.run_dir = args.run_dir or os.path.join("runs", args.dataset)
    return args


LOG_INTERVAL = 30  # seconds between two status lines of a progress bar in a log file


def progress(iterable=None, **kwargs):
    """A tqdm bar (same arguments) for long work. On a terminal, tqdm's own. In a log file (stderr not a terminal:
    CI, `make demo > log`, a cluster job) a redrawn bar is one line per refresh, megabytes of them: there, one plain
    status line every LOG_INTERVAL seconds instead."""
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return LogLines(iterable, file=Discard(), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, **kwargs)


class LogLines(tqdm):
    """tqdm whose refreshes (one per `mininterval`, which `maxinterval` must not undercut, plus the first and the
    last) are printed as whole lines on stderr; its own output (carriage returns, clearing) goes to its `file`, a
    Discard. `display` is the method tqdm's docs name for overloading by another front end."""

    def display(self, msg=None, pos=None):
        if msg != "":  # "" = clear the bar: nothing to log
            print(self.__str__() if msg is None else msg, file=sys.stderr, flush=True)
        return True


class Discard:
    """A text stream that drops what is written to it."""

    def write(self, text):
        return len(text)

    def flush(self):
        pass


def keep_freed_memory():
    """CPU speed, for scripts that call it. glibc's malloc hands every large freed tensor back to the OS and
    page-faults it in again at the next allocation: on this project's 2-core CPU that was 13-22% of a teacher training
    step and ~40% of a DMD step at batch 64 (docs/BENCHMARKS.md). Keep freed memory in the process instead (what
    jemalloc and tcmalloc do). Linux/glibc only; MALLOC_MMAP_MAX_ or MALLOC_TRIM_THRESHOLD_ in the environment mean
    the user chose, and are left alone."""
    if sys.platform != "linux" or {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap, not from mmap (which is unmapped on free)
    libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)  # and the heap's free top is kept, not trimmed
