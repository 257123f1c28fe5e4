from devd.quick import main

raise SystemExit(main())
