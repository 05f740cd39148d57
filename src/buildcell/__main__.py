from buildcell.cli import main

raise SystemExit(main())
