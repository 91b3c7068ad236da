import sys

from rwkv2rknn.cli import main

sys.exit(main())
