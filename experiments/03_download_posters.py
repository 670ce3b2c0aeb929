"""Step 3: ask TMDB once per movie of DATA/links.csv for its details (with credits and keywords) and its
poster: DATA/tmdb/details.jsonl (one JSON line per movie) and DATA/posters/{movieId}.jpg.

    export TMDB_API_KEY=...          # or TMDB_READ_TOKEN=... (v4 read access token)
    python experiments/03_download_posters.py --data dataset/ml-25m
    python experiments/03_download_posters.py --data dataset/ml-25m --retry-failed
    python experiments/03_download_posters.py --data dataset/ml-25m --details-only   # or --posters-only

Reruns skip posters already on disk, movies already in details.jsonl and movies already in a failure log
(experiments/failed_posters.txt, experiments/failed_details.txt); --retry-failed retries only those.
A torn last line of details.jsonl (a killed run) is dropped, with a warning, and that movie fetched again.
Exit status: 0 done (some movies may lack a poster or details: see the logs, DATA/posters/_summary.json
and DATA/tmdb/details_summary.json), 1 bad input or no key, 2 invalid key (HTTP 401), 130 interrupted.
See experiments/tmdb_posters.py and experiments/tmdb_details.py.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import logging

from experiments.tmdb_posters import (DEFAULT_API_BASE, DEFAULT_IMAGE_BASE, DEFAULT_IMAGE_SIZE, DownloadSettings,
                                      InvalidKeyError, MissingKeyError, RetryPolicy, ScrubSecretsFilter,
                                      TmdbCredentials, download_posters)

REPO = pathlib.Path(__file__).resolve().parents[1]
log = logging.getLogger("03_download_posters")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (the key is better passed through the environment than on the command line)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="MovieLens data folder holding links.csv")
    parser.add_argument("--out", default=None, help="posters folder (default: DATA/posters)")
    parser.add_argument("--failed-log", default=str(REPO / "experiments" / "failed_posters.txt"),
                        help="failure log, one tab-separated line per movie without poster")
    parser.add_argument("--details-out", default=None, help="details file (default: DATA/tmdb/details.jsonl)")
    parser.add_argument("--failed-details-log", default=None,
                        help="failure log of the details, one line per movie without details "
                             "(default: failed_details.txt beside --failed-log)")
    halves = parser.add_mutually_exclusive_group()
    halves.add_argument("--posters-only", action="store_true", help="download posters only; write no details")
    halves.add_argument("--details-only", action="store_true", help="save details only; download no image")
    parser.add_argument("--api-key", default=None, help="TMDB v3 API key (default: $TMDB_API_KEY)")
    parser.add_argument("--read-token", default=None, help="TMDB v4 read access token (default: $TMDB_READ_TOKEN)")
    parser.add_argument("--api-base", default=DEFAULT_API_BASE, help="TMDB API root")
    parser.add_argument("--image-base", default=DEFAULT_IMAGE_BASE, help="TMDB image root")
    parser.add_argument("--image-size", default=DEFAULT_IMAGE_SIZE, help="poster size: w92 w154 w185 w342 w500 w780 original")
    parser.add_argument("--workers", type=int, default=8, help="download threads")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second, all threads together (0: no limit)")
    parser.add_argument("--retries", type=int, default=5, help="retries on 429, 5xx, timeouts, bad images")
    parser.add_argument("--backoff", type=float, default=1.0, help="first backoff in seconds (doubles each retry)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each response")
    parser.add_argument("--retry-failed", action="store_true", help="retry only the movies in the failure log")
    parser.add_argument("--overwrite", action="store_true",
                        help="download every poster again (saved details are kept: delete their lines to refetch)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N movies of links.csv")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run the step and return its exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        credentials = TmdbCredentials.resolve(args.api_key, args.read_token)
    except MissingKeyError as exc:
        log.error("%s", exc)
        return 1
    scrubber = ScrubSecretsFilter(credentials.secrets)  # belt and braces: nothing logged may show the key
    for handler in logging.getLogger().handlers:
        handler.addFilter(scrubber)
    settings = DownloadSettings(api_base=args.api_base, image_base=args.image_base, image_size=args.image_size,
                                workers=args.workers, rate=args.rate, timeout=args.timeout,
                                retry=RetryPolicy(retries=args.retries, base_seconds=args.backoff))
    try:
        report = download_posters(args.data, credentials, posters=args.out, failed_log=args.failed_log,
                                  details_out=args.details_out, failed_details_log=args.failed_details_log,
                                  fetch_posters=not args.details_only, fetch_details=not args.posters_only,
                                  settings=settings, retry_failed=args.retry_failed, overwrite=args.overwrite,
                                  limit=args.limit)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    except InvalidKeyError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to resume")
        return 130
    except Exception:  # logged through the scrubbing filter, so no traceback can show the key
        log.exception("unexpected error; rerun the same command to resume")
        return 1
    finally:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(scrubber)
    if "posters" in report["halves"]:
        print(f"{report['downloaded']} downloaded, {report['skipped_existing']} already there, "
              f"{report['failures_in_log']} movies without poster (see {report['failed_log']})")
    if "details" in report["halves"]:
        details = report["details"]
        print(f"{details['saved']} details saved, {details['skipped_existing']} already in {details['details_out']}, "
              f"{details['failures_in_log']} movies without details (see {details['failed_details_log']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
