#!/usr/bin/env python
"""Start a parameter-server job on this machine: one scheduler, S servers and N workers.

    python tools/launch.py -n 2 -- python train.py --kvstore dist_sync --epochs 10

Every process gets the DMLC_* variables MXNet's parameter server reads (DMLC_ROLE, DMLC_PS_ROOT_URI,
DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER, DMLC_NUM_WORKER); the scheduler and servers are plain
``python -c "import mxnet"`` processes (importing mxnet with DMLC_ROLE=server or scheduler runs that
role). The workers' output is prefixed with their index. The exit status is the first failing
worker's, or 0. (MXNet's own ``tools/launch.py`` needs ``dmlc_tracker``, whose local launcher calls
``Thread.isAlive()``, removed in Python 3.9.)

For several machines, run the same variables by hand (docs/speed.md, "Several machines").
"""
import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _pump(stream, prefix, out):
    for line in iter(stream.readline, b''):
        out.write(prefix + line.decode('utf-8', 'replace'))
        out.flush()


def launch(command, num_workers, num_servers=1, host='127.0.0.1', port=None, threads=None, env=None):
    """Run ``command`` (a list) as ``num_workers`` workers; returns the exit status."""
    base = dict(os.environ if env is None else env)
    base.update(DMLC_PS_ROOT_URI=host, DMLC_PS_ROOT_PORT=str(port or free_port()),
                DMLC_NUM_SERVER=str(num_servers), DMLC_NUM_WORKER=str(num_workers),
                PS_VERBOSE=base.get('PS_VERBOSE', '0'))
    if threads:
        base['OMP_NUM_THREADS'] = str(threads)
    helpers = []
    for role in ['scheduler'] + ['server'] * num_servers:
        helpers.append(subprocess.Popen([sys.executable, '-c', 'import mxnet'],
                                        env=dict(base, DMLC_ROLE=role)))
    workers, pumps = [], []
    for rank in range(num_workers):
        proc = subprocess.Popen(command, env=dict(base, DMLC_ROLE='worker'), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        pump = threading.Thread(target=_pump, args=(proc.stdout, '[%d] ' % rank, sys.stdout), daemon=True)
        pump.start()
        workers.append(proc)
        pumps.append(pump)
    status = 0
    try:
        for proc in workers:
            code = proc.wait()
            status = status or code
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
        for proc in helpers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pump in pumps:
            pump.join(timeout=5)
    return status


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('-n', '--num-workers', type=int, required=True, help='worker processes')
    p.add_argument('-s', '--num-servers', type=int, default=1, help='server processes')
    p.add_argument('--port', type=int, help='scheduler port (default: a free one)')
    p.add_argument('--threads', type=int, help='OMP_NUM_THREADS for every process (CPU workers)')
    p.add_argument('command', nargs=argparse.REMAINDER, help='worker command, after --')
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not command:
        p.error('give the worker command after --, e.g. -- python train.py --kvstore dist_sync')
    return launch(command, args.num_workers, args.num_servers, port=args.port, threads=args.threads)


if __name__ == '__main__':
    sys.exit(main())
