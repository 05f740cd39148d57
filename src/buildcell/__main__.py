from buildcell.cli.commands import main

raise SystemExit(main())
