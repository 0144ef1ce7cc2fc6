import sys

from captionstream.cli import main

sys.exit(main())
