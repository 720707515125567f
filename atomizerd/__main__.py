import os
import sys

# gRPC's fork handlers only log noise: agents are spawned with fork+exec, never forked Python.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from atomizerd.daemon.main import main

sys.exit(main())
