from kubetune_operator.cli import main

raise SystemExit(main())
