"""
pytest's setup for every test file: one thread per process. The tests run tiny models, whose matmuls gain
nothing from a second thread, and the scripts they start as subprocesses inherit it: on 2 cores a tiny run
took 14 s with one thread against 40 s with torch's default two contending (issue 17's measurement), and
with pytest -n 2 (pytest-xdist) each worker keeps a core of its own.
"""

import os

os.environ['OMP_NUM_THREADS'] = '1'  # read by torch when it starts: in this process and every subprocess
