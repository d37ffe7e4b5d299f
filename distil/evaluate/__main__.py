import sys

from distil.evaluate.report import main

sys.exit(main())
