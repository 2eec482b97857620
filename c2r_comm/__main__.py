import sys

from c2r_comm.cli import main

sys.exit(main())
