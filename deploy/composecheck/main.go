// composecheck loads compose files the way `docker compose` does (compose-go's loader: schema
// validation against the Compose Specification, interpolation, consistency checks) and exits
// non-zero with the loader's error when a file is invalid. No Docker daemon is needed.
//
//	composecheck [-e NAME=VALUE]... FILE...
//
// Only the variables given with -e are set: the result does not depend on the caller's
// environment. Every profile is enabled, so services behind a profile are checked too.
// Files that the compose file names (secrets, bind mounts, build contexts) need not exist: the
// loader does not open them (docker compose does, at `up`).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
)

type envFlags []string

func (e *envFlags) String() string { return strings.Join(*e, ",") }

func (e *envFlags) Set(value string) error {
	if !strings.Contains(value, "=") {
		return fmt.Errorf("%q is not NAME=VALUE", value)
	}
	*e = append(*e, value)
	return nil
}

func main() {
	var env envFlags
	flag.Var(&env, "e", "NAME=VALUE set for interpolation (repeatable)")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: composecheck [-e NAME=VALUE]... FILE...")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := check(flag.Args(), env); err != nil {
		fmt.Fprintf(os.Stderr, "composecheck: %v\n", err)
		os.Exit(1)
	}
}

func check(files []string, env []string) error {
	options, err := cli.NewProjectOptions(files,
		cli.WithEnv(env),
		cli.WithProfiles([]string{"*"}),
		cli.WithResolvedPaths(true),
	)
	if err != nil {
		return err
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		return err
	}
	fmt.Printf("%s: valid (project %s, %d services, %d secrets, %d volumes)\n",
		strings.Join(files, ", "), project.Name, len(project.Services), len(project.Secrets),
		len(project.Volumes))
	return nil
}
