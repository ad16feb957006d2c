from k2d.cli import main

raise SystemExit(main())
