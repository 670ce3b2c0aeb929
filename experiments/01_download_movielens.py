"""Step 1: download a MovieLens release into dataset/<name>/, verified against the official checksums.

    python experiments/01_download_movielens.py                      # ml-25m into dataset/ml-25m/
    python experiments/01_download_movielens.py --release ml-latest-small --dest dataset

Resumes an interrupted download, skips a folder it already verified, and on failure says how to
place the files by hand. See experiments/download.py.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import logging

from experiments.download import DEFAULT_BASE_URL, DEFAULT_RELEASE, RELEASES, DownloadError, RetryPolicy, fetch_movielens


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", default=DEFAULT_RELEASE, choices=sorted(RELEASES), help="MovieLens release")
    parser.add_argument("--dest", default="dataset", help="data root; the release lands in DEST/<release>/")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="where <release>.zip and .zip.md5 live")
    parser.add_argument("--sha256", default=None,
                        help="expected sha256 of the zip (default: the embedded official one, known for ml-25m)")
    parser.add_argument("--overwrite", action="store_true", help="download and extract again even if present")
    parser.add_argument("--keep-zip", action="store_true", help="keep DEST/<release>.zip after extracting")
    parser.add_argument("--retries", type=int, default=4, help="retries on transient network errors")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run the step; return the exit status (0 ok, 1 failed with a message saying what to do)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        folder = fetch_movielens(args.release, args.dest, base_url=args.base_url, sha256=args.sha256,
                                 overwrite=args.overwrite, keep_zip=args.keep_zip,
                                 retry=RetryPolicy(retries=args.retries), timeout=args.timeout)
    except DownloadError as exc:
        logging.getLogger("01_download_movielens").error("%s", exc)
        return 1
    print(f"MovieLens {args.release} is ready in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
