"""The Flower launcher's console (launcher/flower.py): our lines whole, Flower's own noise kept in the log."""
import io

from launcher import flower

STREAM = [
    "Loading project configuration... \n",
    "🎊 Successfully started run 4242\n",
    "\x1b[92mINFO \x1b[0m:      Starting FedAvg strategy:\n",
    "\x1b[93mWARNING \x1b[0m:   fraction_evaluate is set to 0.0. Federated evaluation will be skipped.\n",
    "\x1b[92mINFO 2026-01-02 10:11:12,345\x1b[0m:      [ROUND 1/2]\n",
    "round train loss clipped grad norm     mAP     CF1     OF1  seconds\n",
    "    1     4.5866     33%     16.67   45.51   46.60   42.02      5.0\n",
    "warning: the gradient-norm guard clipped 97% of the local steps over the run\n",
    "\x1b[93mWARNING \x1b[0m:   No fit_metrics_aggregation_fn provided\n",
    "\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception\n",
]


def test_flowers_info_lines_and_expected_warning_stay_in_the_log_and_ours_reach_the_console(tmp_path, capsys):
    run_ids = []
    flower.pass_through(io.StringIO("".join(STREAM)), run_ids, tmp_path / "flwr-run.log")
    console = capsys.readouterr().out
    assert run_ids == [4242]
    assert (tmp_path / "flwr-run.log").read_text() == "".join(STREAM)  # every line kept
    assert console == "".join(STREAM[i] for i in (0, 1, 5, 6, 7, 8, 9))
