"""experiments/plot_convergence.py: curves read from real log formats, wall time from the first line, resumed logs refused."""
import pytest

from experiments import plot_convergence

TIGER_LOG = """\
2026-12-01 10:00:00,000 train_decoder INFO reference: most-popular NLL of the validation items 8.218 nats
2026-12-01 10:01:40,000 train_decoder INFO step 200 validation recall@5=0.0361 recall@10=0.0459 ndcg@5=0.0228 ndcg@10=0.0259 nll=8.2802 | untied (496 users) recall@5=0.03 recall@10=0.04 ndcg@5=0.02 ndcg@10=0.0111 nll=9.0
2026-12-01 10:03:20,000 train_decoder INFO step 400 validation recall@5=0.0377 recall@10=0.0557 ndcg@5=0.0236 ndcg@10=0.0296 nll=8.2225 | untied (496 users) recall@5=0.03 recall@10=0.04 ndcg@5=0.02 ndcg@10=0.0111 nll=9.0
"""
SASREC_LOG = """\
2026-12-01 11:45:13,829 INFO experiments.baselines: device: cpu (float32), 1 threads
2026-12-01 11:45:28,574 INFO experiments.baselines: epoch 1: loss 8.7556, valid recall@5 0.0213 recall@10 0.0344 ndcg@5 0.0128 ndcg@10 0.0169 (best)
2026-12-01 11:45:43,000 INFO experiments.baselines: epoch 2: loss 7.1, valid recall@5 0.03 recall@10 0.05 ndcg@5 0.02 ndcg@10 0.0301 (best)
"""


def test_curves_take_the_overall_metrics_not_the_untied_ones_and_count_from_the_first_line(tmp_path):
    (tmp_path / "tiger.log").write_text(TIGER_LOG)
    (tmp_path / "sasrec.log").write_text(SASREC_LOG)
    tiger = plot_convergence.read_curve(tmp_path / "tiger.log")
    assert [(p["step"], p["seconds"], p["ndcg@10"], p["nll"]) for p in tiger] == [(200, 100.0, 0.0259, 8.2802),
                                                                                   (400, 200.0, 0.0296, 8.2225)]
    sasrec = plot_convergence.read_curve(tmp_path / "sasrec.log")
    assert [(p["step"], round(p["seconds"], 3), p["ndcg@10"], p["nll"]) for p in sasrec] == [(1, 14.745, 0.0169, None),
                                                                                           (2, 29.171, 0.0301, None)]
    out = tmp_path / "curves.png"
    plot_convergence.main([f"tiger={tmp_path / 'tiger.log'}", f"sasrec={tmp_path / 'sasrec.log'}", "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_log_and_a_log_without_points_are_refused(tmp_path):
    (tmp_path / "resumed.log").write_text(TIGER_LOG + TIGER_LOG.replace("10:0", "12:0"))
    with pytest.raises(SystemExit, match="resumed run"):
        plot_convergence.read_curve(tmp_path / "resumed.log")
    (tmp_path / "empty.log").write_text(TIGER_LOG.splitlines()[0] + "\n")
    with pytest.raises(SystemExit, match="no validation lines"):
        plot_convergence.read_curve(tmp_path / "empty.log")
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        plot_convergence.main([str(tmp_path / "empty.log"), "--out", str(tmp_path / "x.png")])
