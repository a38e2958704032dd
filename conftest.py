"""
pytest's setup for every test file: one thread per process. The tests run tiny models, whose matmuls
gain nothing from a second thread, and the scripts they start as subprocesses inherit it: on 2 cores
torch's default of two threads per process makes them contend and a tiny run much slower, and with
pytest -n 2 (pytest-xdist) each worker keeps a core of its own.
"""

import os

# read by torch when it starts: in this process and every subprocess
os.environ['OMP_NUM_THREADS'] = '1'
