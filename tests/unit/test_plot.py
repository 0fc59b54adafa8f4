import json


from mswift.train.plot import main, plot_run


def test_plot_writes_a_png(tmp_path):
    rows = [{"step": i, "loss": 5.0 - 0.1 * i, "lr": 1e-3, "tokens_per_s": 100.0 + i}
            for i in range(1, 6)]
    rows[2]["eval_loss"] = 4.9
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_run(tmp_path, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert not list(tmp_path.glob("*.tmp.png"))


def test_plot_errors_name_the_file(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl:2: not a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "curves.png").exists()


def test_metrics_of_older_runs_read_under_todays_names(tmp_path):
    from mswift.train.plot import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "tokens": 42}\n'
                                            '{"step": 2, "loss": 1.9, "loss_tokens": 40}\n')
    rows = read_metrics(tmp_path)
    assert [r["loss_tokens"] for r in rows] == [42, 40]
    assert all("tokens" not in r for r in rows)
