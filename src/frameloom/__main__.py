from frameloom.cli import main

raise SystemExit(main())
