from sfsd.cli.main import main

raise SystemExit(main())
