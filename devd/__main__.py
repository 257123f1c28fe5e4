from devd.cli import main

raise SystemExit(main())
