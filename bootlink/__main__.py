from bootlink.cli import main

raise SystemExit(main())
