"""
Plots train and val loss (and bits per byte, HellaSwag) against tokens seen, from the log.jsonl
that train.py writes in its out_dir (one JSON object per log or evaluation line):

    python plot.py out-shakespeare-char-cpu       # writes out-shakespeare-char-cpu/loss.png
    python plot.py out-a out-b --out=compare.png  # several runs on one plot

train.py writes log.jsonl through RunLog, and calls draw() at every evaluation when matplotlib
is installed.
"""

import argparse
import json
import os
import sys


def read_log(out_dir):
    """The records of out_dir/log.jsonl, as a list of dicts."""
    with open(os.path.join(out_dir, 'log.jsonl'), encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


class RunLog:
    """out_dir/log.jsonl, written as train.py runs: one JSON object per line. A resumed run
    first drops the records from its checkpoint's iteration on, which it is about to redo."""

    def __init__(self, out_dir, resume_at=0, plot=True):
        self.out_dir, self.plot = out_dir, plot
        self.path = os.path.join(out_dir, 'log.jsonl')
        keep = [r for r in read_log(out_dir) if r['iter'] < resume_at] \
            if resume_at and os.path.isfile(self.path) else []
        # kept open, line-buffered: each record reaches the file as it is written, without an open
        # and a close per line (a cost paid at every step with log_interval=1)
        self.file = open(self.path, 'w', encoding='utf-8', buffering=1)
        self.file.writelines(json.dumps(r) + '\n' for r in keep)

    def record(self, plot=False, **fields):
        """Append a record; with plot=True (at evaluations) redraw out_dir/loss.png too."""
        self.file.write(json.dumps(fields) + '\n')
        if plot and self.plot:
            try:
                draw([self.out_dir])
            except ImportError as e:
                print(f"({e}, or --plot=False)")
                self.plot = False  # said once


def draw(out_dirs, path=None):
    """Draw each run's training loss (thin) and its evaluations (dots: train hollow, val filled)
    against tokens seen, with panels beside it for bits per byte and HellaSwag where the logs have
    them; write the PNG to path (default: the first run's loss.png)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use('Agg')  # draw to a file; no window, no display needed
    import matplotlib.pyplot as plt

    runs = [(os.path.basename(os.path.normpath(d)), read_log(d)) for d in out_dirs]
    evals = [[r for r in records if 'val_loss' in r] for _, records in runs]
    # a panel for bits per byte (comparable across tokenizers) and one for HellaSwag, when the logs
    # have them
    panels = ['loss'] + [p for p, field in (('bpb', 'val_bpb'),
                                            ('hellaswag_acc_norm', 'hellaswag_acc_norm'))
                         if any(field in r for e in evals for r in e)]
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5), squeeze=False)
    for i, ((name, records), evs) in enumerate(zip(runs, evals)):
        color = f'C{i}'
        steps = [r for r in records if 'loss' in r]
        for ax, panel in zip(axes[0], panels):
            if panel == 'loss':
                ax.plot([r['tokens'] for r in steps], [r['loss'] for r in steps], color=color,
                        alpha=0.35, lw=0.8)
            if panel == 'hellaswag_acc_norm':
                rs = [r for r in evs if panel in r]
                ax.plot([r['tokens'] for r in rs], [r[panel] for r in rs], 'o-', color=color,
                        label=name)
                continue
            for split, mfc in (('train', 'white'), ('val', color)):  # train hollow, val filled
                field = f'{split}_{panel}'  # train_loss, val_loss, train_bpb, val_bpb
                rs = [r for r in evs if field in r]
                ax.plot([r['tokens'] for r in rs], [r[field] for r in rs], 'o-', color=color,
                        mfc=mfc, label=f'{name} {split}')
    labels = {'loss': 'loss (cross-entropy, nats per token)',
              'bpb': 'bits per byte (any tokenizer: loss / ln 2 per byte of text)',
              'hellaswag_acc_norm': 'HellaSwag acc_norm (0.25: chance)'}
    for ax, panel in zip(axes[0], panels):
        ax.set_xlabel('tokens seen')
        ax.set_ylabel(labels[panel])
        ax.grid(alpha=0.3)
        ax.legend()
    path = path or os.path.join(out_dirs[0], 'loss.png')
    fig.savefig(path + '.tmp.png', dpi=120, bbox_inches='tight')
    os.replace(path + '.tmp.png', path)  # a viewer refreshing the file never sees half an image
    plt.close(fig)
    return path


if __name__ == '__main__':
    parser = argparse.ArgumentParser(
        description="Plot loss against tokens seen from train.py's log.jsonl.")
    parser.add_argument('out_dirs', nargs='+', help="train.py's out_dir(s)")
    parser.add_argument('--out', help="the PNG to write (default: loss.png in the first out_dir)")
    args = parser.parse_args()
    for d in args.out_dirs:
        if not os.path.isfile(os.path.join(d, 'log.jsonl')):
            sys.exit(f"error: {d}/log.jsonl not found: is '{d}' an out_dir of train.py?")
    try:
        print(f"wrote {draw(args.out_dirs, args.out)}")
    except ImportError as e:
        sys.exit(f"error: {e}")
