import sys

from atomizerd.daemon.main import main

sys.exit(main())
