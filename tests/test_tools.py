"""
bench.py and plot.py, whose numbers and pictures the README shows: each bench.py mode runs on a tiny
shape and prints its table, every figure positive and the plain way's own ratio 1.00x (what the speeds
are is the machine's business, not a test's); plot.py draws the logged curves of several runs into
one PNG. As subprocesses where a user runs them, in a copy of the repository.
"""

import json
import os
import re

import pytest

import plot
from test_checkpoint import NANOGPT
from test_scripts import assert_one_line_error, repo, run  # noqa: F401 (repo is a fixture)

NUMBER = r'([0-9][0-9,]*\.?[0-9]*)'


def numbers(line):
    return [float(x.replace(',', '')) for x in re.findall(NUMBER, line)]


def is_quotient(printed, num, den, half, printed_half=0.005):
    """printed (rounded to +-printed_half) can be num / den, each of those printed rounded to +-half."""
    low, high = (num - half) / (den + half), (num + half) / (den - half) if den > half else float('inf')
    return low - printed_half <= printed <= high + printed_half


def test_bench_train_table(repo):  # noqa: F811
    variants = ['plain', 'fused', 'bf16', 'bf16+manual', '1thread']  # compile: a minute to compile, not seconds
    p = run(repo, 'bench.py', '--mode=train', '--shape=tiny', f'--variants={",".join(variants)}', '--rounds=1',
            '--iters=2', '--warmup=1')
    rows = {line.split()[0]: line for line in p.stdout.splitlines() if line.split() and line.split()[0] in variants}
    assert list(rows) == variants, p.stdout
    assert re.search(r'^plain +[0-9.]+ +[0-9,]+ +[0-9.]+ +1\.00x ', rows['plain'], re.M), rows['plain']
    for name, line in rows.items():
        ms, tokens_s, gflops, ratio, first, loss = numbers(line.split(None, 1)[1])
        assert ms > 0 and tokens_s > 0 and ratio > 0 and first >= 0, line
        assert loss == pytest.approx(4.17, abs=0.1), line  # ln 65: two steps from the initialisation
    assert 'reproduce: python bench.py --mode=train --shape=tiny' in p.stdout


def test_bench_sample_table(repo):  # noqa: F811
    p = run(repo, 'bench.py', '--mode=sample', '--shape=tiny', '--new_tokens=20', '--repeats=1')
    rows = [line for line in p.stdout.splitlines() if re.match(r' *(15|20) \(', line)]
    assert len(rows) == 8, p.stdout  # 2 lengths x 4 ways
    for line in rows:
        tokens_s, ratio = numbers(line.split(')')[1].replace('bf16', ''))
        assert tokens_s > 0 and ratio > 0, line
    for line in rows:
        way = line.split(')')[1].split()[0]
        if way == 'plain':
            assert ' 1.00x' in line, line
        if way == 'cache':  # float32 both: the cache changes no token
            assert line.rstrip().endswith('yes'), line


@pytest.mark.skipif(not os.path.isdir(NANOGPT), reason=f"no nanoGPT checkout at {NANOGPT} (set NANOGPT=PATH)")
def test_bench_against_nanogpt_whole_processes(repo):  # noqa: F811
    """--nanogpt: its train.py and ours on nanoGPT's command (shortened), the speedrun config, and both sample.py
    on nanoGPT's baby GPT: each table's rows and ratios printed from the runs' own logs."""
    settings = dict(dataset="'shakespeare_char'", max_iters=2, eval_interval=2, eval_iters=2, n_layer=1, n_head=2,
                    n_embd=16, block_size=16, batch_size=2)
    (repo / 'config' / 'tiny_speedrun.py').write_text(''.join(f'{k} = {v}\n' for k, v in settings.items()))
    p = run(repo, 'bench.py', '--mode=train', '--variants=', f'--nanogpt={NANOGPT}', '--processes=1',
            '--nanogpt_iters=3', '--speedrun=config/tiny_speedrun.py')
    rows = {m[1]: numbers(m[2]) for m in re.finditer(r'^(nanoGPT|ours|speedrun) +([0-9].*)$', p.stdout, re.M)}
    assert list(rows) == ['nanoGPT', 'ours', 'speedrun'], p.stdout
    for name, (ms, iters_s, seconds, val) in rows.items():
        assert is_quotient(iters_s, 1000, ms, 0.005), (name, p.stdout)  # 1000 / ms (ms to 2 decimals)
        assert seconds > 0, (name, p.stdout)
        assert 3.5 < val < 4.5, (name, p.stdout)  # about ln 65 after a few steps
    ratio = re.search(r'ours vs nanoGPT: ([0-9.]+)x the iterations/s, ([0-9.]+)x the whole-process time', p.stdout)
    (ms_a, _, a, _), (ms_b, _, b, _) = rows['nanoGPT'], rows['ours']  # ms to 0.01, seconds to 0.1
    assert ratio and is_quotient(float(ratio[1]), ms_a, ms_b, 0.005), p.stdout
    assert is_quotient(float(ratio[2]), b, a, 0.05), p.stdout
    assert re.search(r"speedrun \(config/tiny_speedrun.py\) vs nanoGPT's command: [0-9.]+x", p.stdout), p.stdout
    assert '--nanogpt_iters=3' in p.stdout.splitlines()[-1]
    p = run(repo, 'bench.py', '--mode=sample', '--ways=', f'--nanogpt={NANOGPT}', '--processes=1', '--new_tokens=5')
    times = {m[1]: float(m[2]) for m in re.finditer(r'^(nanoGPT|ours) +([0-9.]+) s', p.stdout, re.M)}
    ratio = re.search(r'ours vs nanoGPT: ([0-9.]+)x the time', p.stdout)
    assert ratio and is_quotient(float(ratio[1]), times['ours'], times['nanoGPT'], 0.005), p.stdout  # s to 0.01
    assert '1 sample of 5 tokens' in p.stdout, p.stdout


def test_bench_prepare_report(repo):  # noqa: F811
    p = run(repo, 'bench.py', '--mode=prepare', '--mb=0.05')
    lines = {k: line for line in p.stdout.splitlines() for k in ('end to end', 'on one core', 'share', 'peak')
             if k in line}
    assert len(lines) == 4, p.stdout
    end_to_end, one_core = numbers(lines['end to end'])[0], numbers(lines['on one core'])[0]
    assert end_to_end > 0 and one_core > 0 and numbers(lines['peak'])[0] > 0
    # the share is end to end over the cores' limit, in whole percent (0 % or 1 % on this tiny corpus)
    cores, share = numbers(lines['share'].split('(')[1])[0], numbers(lines['share'].split(':')[1])[0]
    assert share == pytest.approx(100 * end_to_end / (cores * one_core), abs=1), lines['share']
    assert re.search(r'GPT-2 BPE, 0\.05\d* MB corpus, [1-9][0-9,]* tokens', p.stdout), p.stdout
    assert not (repo / 'data' / '_bench_prepare').exists()  # its dataset is removed afterwards


def write_log(out_dir, records):
    out_dir.mkdir()
    (out_dir / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


def fake_run(out_dir, scale):
    """A log as train.py writes it: a training line per iteration, an evaluation at 0, 2 and 4."""
    steps = [dict(iter=i, tokens=(i + 1) * 64, lr=1e-3, loss=scale * (4.2 - 0.3 * i), ms=5.0) for i in range(4)]
    evals = [dict(iter=i, tokens=i * 64, train_loss=scale * (4.1 - 0.3 * i), val_loss=scale * (4.2 - 0.25 * i))
             for i in (0, 2, 4)]
    write_log(out_dir, steps + evals)
    return steps, evals


def test_plot_draws_several_runs(repo, tmp_path, monkeypatch):  # noqa: F811
    """python plot.py A B --out=x.png writes the PNG; drawn here, its figure holds each run's three curves
    (training loss, train and val evaluations) with the logged numbers against tokens, labelled by run."""
    runs = {name: fake_run(tmp_path / name, scale) for name, scale in (('run-a', 1.0), ('run-b', 0.5))}
    p = run(repo, 'plot.py', str(tmp_path / 'run-a'), str(tmp_path / 'run-b'), f'--out={tmp_path / "both.png"}')
    assert p.stdout.strip() == f"wrote {tmp_path / 'both.png'}"
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / 'both.png')  # a PNG that decodes
    assert image.shape[0] > 100 and image.shape[1] > 100 and image[..., :3].std() > 0  # not blank

    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, 'close', figures.append)  # keep the figure draw() makes
    plot.draw([str(tmp_path / 'run-a'), str(tmp_path / 'run-b')], str(tmp_path / 'again.png'))
    lines = figures[0].axes[0].get_lines()
    assert len(lines) == 6
    for (name, (steps, evals)), (thin, train, val) in zip(runs.items(), (lines[:3], lines[3:])):
        assert list(thin.get_xdata()) == [r['tokens'] for r in steps]
        assert list(thin.get_ydata()) == [r['loss'] for r in steps]
        assert list(train.get_xdata()) == list(val.get_xdata()) == [r['tokens'] for r in evals]
        assert list(train.get_ydata()) == [r['train_loss'] for r in evals]
        assert list(val.get_ydata()) == [r['val_loss'] for r in evals]
        assert (train.get_label(), val.get_label()) == (f'{name} train', f'{name} val')
    assert thin.get_color() != lines[0].get_color()  # a colour per run

    assert_one_line_error(run(repo, 'plot.py', str(tmp_path), ok=False), 'log.jsonl not found')
